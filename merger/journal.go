package merger

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"sync"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// The journal ("clusters.journal" in a session directory) is the
// session's index: an append-only list of fixed-size records, one per
// accepted upload, each saying where the new version of a cluster lives
// in the data file. It is the only metadata an upload writes, and it is
// written after the data it points at is synced.
//
//	header (16 bytes, written once when the session is created)
//	  0  [8]byte  magic "dnbd3mj1"
//	  8  uint32   format version (1)
//	 12  uint32   record size (72)
//	record (72 bytes, little-endian), repeated
//	  0  uint64   sequence number, strictly increasing
//	  8  uint32   cluster index, < MaxClusters
//	 12  uint32   slot in the data file (0xFFFFFFFF: no blocks)
//	 16  uint32   modifications of this cluster so far, this one included
//	 20  uint32   CRC-32C of the stored blocks (popcount(bitfield) x 4 KiB)
//	 24  [40]byte bitfield, LSB first: bit n = 4 KiB block n of the cluster
//	 64  uint32   reserved, 0
//	 68  uint32   CRC-32C of bytes 0..67 of the record
//
// Replay reads records until the first one that is incomplete, fails its
// CRC or breaks the sequence; that record and everything after it belong
// to a batch whose fsync never completed (batches are written one after
// the other, each synced before the next starts), so none of it was
// acknowledged, and the file is truncated there. For each cluster the
// record with the highest sequence number is its current version.
//
// Appends are group-committed: uploads that arrive while a batch is being
// synced queue up and go to disk together in the next batch, one
// fdatasync of the data file and one of the journal for all of them.

const (
	journalMagic      = "dnbd3mj1"
	journalVersion    = 1
	journalHeaderSize = 16
	journalRecordSize = 72
)

// castagnoli is the CRC-32C table used for records and block data.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// journalRecord is one record of the journal.
type journalRecord struct {
	Seq      uint64
	Cluster  uint32
	Slot     uint32
	Mods     uint32
	DataCRC  uint32
	Bitfield [cowformat.BitfieldSize]byte
}

func (r *journalRecord) appendTo(b []byte) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(b, r.Seq)
	b = binary.LittleEndian.AppendUint32(b, r.Cluster)
	b = binary.LittleEndian.AppendUint32(b, r.Slot)
	b = binary.LittleEndian.AppendUint32(b, r.Mods)
	b = binary.LittleEndian.AppendUint32(b, r.DataCRC)
	b = append(b, r.Bitfield[:]...)
	b = binary.LittleEndian.AppendUint32(b, 0)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// decodeRecord decodes and checks one record; prevSeq is the sequence
// number of the record before it.
func decodeRecord(p []byte, prevSeq uint64) (journalRecord, error) {
	var r journalRecord
	if crc32.Checksum(p[:68], castagnoli) != binary.LittleEndian.Uint32(p[68:]) {
		return r, errors.New("merger: record checksum mismatch")
	}
	r.Seq = binary.LittleEndian.Uint64(p[0:])
	r.Cluster = binary.LittleEndian.Uint32(p[8:])
	r.Slot = binary.LittleEndian.Uint32(p[12:])
	r.Mods = binary.LittleEndian.Uint32(p[16:])
	r.DataCRC = binary.LittleEndian.Uint32(p[20:])
	copy(r.Bitfield[:], p[24:64])
	switch {
	case r.Seq <= prevSeq:
		return r, fmt.Errorf("merger: sequence %d after %d", r.Seq, prevSeq)
	case r.Cluster >= cowformat.MaxClusters:
		return r, fmt.Errorf("merger: cluster %d out of range", r.Cluster)
	case (r.Slot == noSlot) != (popcount(&r.Bitfield) == 0):
		return r, fmt.Errorf("merger: slot %d does not match the bitfield", r.Slot)
	case r.Slot != noSlot && r.Slot >= maxSlots:
		return r, fmt.Errorf("merger: slot %d out of range", r.Slot)
	}
	return r, nil
}

func journalHeader() []byte {
	h := append([]byte(journalMagic), 0, 0, 0, 0, 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(h[8:], journalVersion)
	binary.LittleEndian.PutUint32(h[12:], journalRecordSize)
	return h
}

// createJournal creates an empty journal at path and syncs it (the caller
// syncs the directory).
func createJournal(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(journalHeader())
	if err == nil {
		err = fdatasync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// replayResult is what reading a journal found.
type replayResult struct {
	records  []journalRecord // valid records, in order
	validEnd int64           // offset after the last valid record
	size     int64           // file size
	reason   error           // why reading stopped before size, if it did
}

// readJournal reads every valid record of the journal in f.
func readJournal(f *os.File) (replayResult, error) {
	st, err := f.Stat()
	if err != nil {
		return replayResult{}, err
	}
	res := replayResult{size: st.Size(), validEnd: journalHeaderSize}
	hdr := make([]byte, journalHeaderSize)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return res, fmt.Errorf("journal %s: header: %w", f.Name(), err)
	}
	if string(hdr[:8]) != journalMagic ||
		binary.LittleEndian.Uint32(hdr[8:]) != journalVersion ||
		binary.LittleEndian.Uint32(hdr[12:]) != journalRecordSize {
		return res, fmt.Errorf("merger: journal %s: not a version %d merger journal", f.Name(), journalVersion)
	}
	r := io.NewSectionReader(f, journalHeaderSize, res.size-journalHeaderSize)
	buf := make([]byte, 4096*journalRecordSize)
	var prevSeq uint64
	for {
		n, err := io.ReadFull(r, buf)
		full := n - n%journalRecordSize
		for p := 0; p < full; p += journalRecordSize {
			rec, derr := decodeRecord(buf[p:p+journalRecordSize], prevSeq)
			if derr != nil {
				res.reason = fmt.Errorf("record at offset %d: %w", res.validEnd, derr)
				return res, nil
			}
			prevSeq = rec.Seq
			res.records = append(res.records, rec)
			res.validEnd += journalRecordSize
		}
		if n%journalRecordSize != 0 {
			res.reason = fmt.Errorf("merger: incomplete record at offset %d (%d bytes)", res.validEnd, n%journalRecordSize)
			return res, nil
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return res, nil
		}
		if err != nil {
			return res, fmt.Errorf("journal %s: %w", f.Name(), err)
		}
	}
}

// journal appends records to an open journal file with group commit.
type journal struct {
	f    *os.File
	data *os.File // synced before each batch of records that points into it
	// durable is called with each batch of records once they are on
	// disk, in sequence order, with j.mu held; failed with each batch
	// whose write failed (broken: the journal is now unusable, and the
	// records may or may not be on disk).
	durable func(recs []journalRecord)
	failed  func(recs []journalRecord, broken bool)

	mu      sync.Mutex
	cond    sync.Cond
	end     int64  // offset after the last durable record
	nextSeq uint64 // sequence number of the next record
	cur     *journalBatch
	syncing bool   // a leader is writing a batch
	broken  error  // sticky: a sync failed, the on-disk state is unknown
	batches uint64 // batches written (statistics)
}

// journalBatch is a group of records committed together.
type journalBatch struct {
	recs []journalRecord
	buf  []byte
	done bool
	err  error
}

func newJournal(f, data *os.File, end int64, nextSeq uint64, durable func([]journalRecord), failed func([]journalRecord, bool)) *journal {
	j := &journal{f: f, data: data, end: end, nextSeq: nextSeq, durable: durable, failed: failed, cur: &journalBatch{}}
	j.cond.L = &j.mu
	return j
}

// append assigns rec the next sequence number, makes it durable (after
// syncing the data file, whose blocks the caller already wrote) and
// returns once it is on disk. rec.Mods is computed by mods under j.mu,
// so that concurrent uploads of one cluster count correctly.
//
// If append fails, the failed callback has seen rec (unless the journal
// was already broken, in which case rec was never queued).
func (j *journal) append(rec journalRecord, mods func(cluster uint32) uint32) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.broken != nil {
		return j.broken
	}
	rec.Seq = j.nextSeq
	j.nextSeq++
	rec.Mods = mods(rec.Cluster)
	b := j.cur
	b.recs = append(b.recs, rec)
	b.buf = rec.appendTo(b.buf)
	for !b.done {
		if j.syncing {
			j.cond.Wait()
			continue
		}
		// Become the leader: take the batch being filled (ours, or a later
		// one if ours was written by the previous leader - then ours is
		// done and the loop ends) and write it.
		batch := j.cur
		j.cur = &journalBatch{}
		if j.broken != nil { // an earlier batch broke the journal
			j.failed(batch.recs, true)
			batch.done, batch.err = true, j.broken
			j.cond.Broadcast()
			continue
		}
		j.syncing = true
		end := j.end
		j.mu.Unlock()
		err := j.write(batch, end)
		j.mu.Lock()
		j.syncing = false
		if err == nil {
			j.end += int64(len(batch.buf))
			j.batches++
			j.durable(batch.recs)
		} else {
			j.failed(batch.recs, j.broken != nil)
		}
		batch.done, batch.err = true, err
		j.cond.Broadcast()
	}
	return b.err
}

// write syncs the data file, writes the batch at end and syncs the
// journal. A failed write is undone (the journal is cut back to end) and
// only fails this batch; a failed sync makes the journal unusable, since
// after a failed fsync the kernel may have dropped the dirty pages and
// nothing can tell what reached the disk.
func (j *journal) write(b *journalBatch, end int64) error {
	if err := fdatasync(j.data); err != nil {
		return j.fail(fmt.Errorf("sync data file: %w", err))
	}
	if _, err := j.f.WriteAt(b.buf, end); err != nil {
		if terr := j.f.Truncate(end); terr != nil {
			return j.fail(fmt.Errorf("write journal: %w (and cutting it back: %v)", err, terr))
		}
		return fmt.Errorf("write journal: %w", err)
	}
	if err := fdatasync(j.f); err != nil {
		return j.fail(fmt.Errorf("sync journal: %w", err))
	}
	return nil
}

// isBroken returns the sticky error of a journal whose sync failed.
func (j *journal) isBroken() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.broken
}

func (j *journal) fail(err error) error {
	err = fmt.Errorf("%w; the session's store is unusable until the service restarts and replays its journal", err)
	j.mu.Lock()
	j.broken = err
	j.mu.Unlock()
	return err
}

// popcount returns the number of set bits of a bitfield.
func popcount(bf *[cowformat.BitfieldSize]byte) int {
	n := 0
	for i := 0; i < cowformat.BitfieldSize; i += 8 {
		n += bits.OnesCount64(binary.LittleEndian.Uint64(bf[i:]))
	}
	return n
}
