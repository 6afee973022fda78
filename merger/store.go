package merger

import (
	"cmp"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// A session's uploaded clusters live in two files of its directory:
//
//	clusters.data     slots of ClusterSize bytes; slot s starts at offset
//	                  s*ClusterSize. A cluster version with k set bits
//	                  stores its k blocks packed at the start of its slot,
//	                  in ascending bit order (the rest of the slot is
//	                  unused; never written, it stays a hole).
//	clusters.journal  the index: which slot holds the current version of
//	                  each cluster, with its bitfield and the CRC-32C of
//	                  its stored blocks (see journal.go).
//
// An upload writes its blocks into a free slot - never the slot of the
// cluster's current version - then the journal record is group-committed
// (fdatasync data, append, fdatasync journal), and only then is the old
// slot freed. A crash at any point leaves the journal pointing at intact
// data: the new version if its record is complete, else the old one.
const (
	dataFileName    = "clusters.data"
	journalFileName = "clusters.journal"
)

// clusterEntry is the in-memory index entry of a cluster's current
// version (about 56 bytes: the index holds no block data).
type clusterEntry struct {
	slot     uint32
	mods     uint32
	crc      uint32
	bitfield [cowformat.BitfieldSize]byte
}

// entry returns the index entry of the cluster version r records.
func (r *journalRecord) entry() clusterEntry {
	return clusterEntry{slot: r.Slot, mods: r.Mods, crc: r.DataCRC, bitfield: r.Bitfield}
}

// clusterVersion is one cluster to apply in a merge.
type clusterVersion struct {
	cluster  uint32
	slot     uint32
	crc      uint32
	bitfield [cowformat.BitfieldSize]byte
}

// store is a session's uploaded clusters: data file, journal and the
// index replayed from it. Its methods are safe for concurrent use.
type store struct {
	dir  string
	data *os.File
	jf   *os.File
	j    *journal

	mu      sync.Mutex
	index   map[uint32]clusterEntry
	pending map[uint32]uint32 // clusters with records queued but not yet durable
	slots   *slotAllocator
	// Quota: at most maxClusters distinct clusters, counting the ones
	// in the index and new ones being uploaded (see reserve).
	maxClusters int
	inflight    map[uint32]int  // uploads in progress by cluster
	newInflight map[uint32]bool // clusters in progress that were not in the index
}

// createStoreFiles creates the empty data file and journal of a new
// session and syncs them; the caller syncs dir.
func createStoreFiles(dir string) error {
	if err := createJournal(filepath.Join(dir, journalFileName)); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, dataFileName), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// removeStoreFiles deletes the data file and the journal of a session
// whose merge is done.
func removeStoreFiles(dir string) error {
	var errs []error
	for _, name := range []string{dataFileName, journalFileName, journalFileName + ".tmp"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// openStore opens the store in dir and replays its journal. A torn tail
// is logged and cut off; a journal with many superseded records is
// compacted.
func openStore(dir string, log *slog.Logger) (*store, error) {
	data, err := os.OpenFile(filepath.Join(dir, dataFileName), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open session data: %w", err)
	}
	s := &store{dir: dir, data: data, pending: make(map[uint32]uint32), maxClusters: cowformat.MaxClusters,
		inflight: make(map[uint32]int), newInflight: make(map[uint32]bool)}
	if err := s.replay(log); err != nil {
		data.Close()
		if s.jf != nil {
			s.jf.Close()
		}
		return nil, err
	}
	return s, nil
}

func (s *store) replay(log *slog.Logger) error {
	jpath := filepath.Join(s.dir, journalFileName)
	jf, err := os.OpenFile(jpath, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open session journal: %w", err)
	}
	s.jf = jf
	res, err := readJournal(jf)
	if err != nil {
		return err
	}
	if res.validEnd < res.size {
		log.Warn("session journal: dropping an incomplete tail (an upload that was never acknowledged)",
			"journal", jpath, "offset", res.validEnd, "bytes", res.size-res.validEnd, "reason", res.reason)
		if err := jf.Truncate(res.validEnd); err != nil {
			return fmt.Errorf("cut torn tail of %s: %w", jpath, err)
		}
		if err := fdatasync(jf); err != nil {
			return err
		}
	}
	s.index = make(map[uint32]clusterEntry)
	var nextSeq uint64 = 1
	for _, r := range res.records {
		s.index[r.Cluster] = r.entry()
		nextSeq = r.Seq + 1
	}
	end := res.validEnd
	if len(res.records) > 2*len(s.index)+1024 {
		if end, err = s.compact(res.records); err != nil {
			return err
		}
		log.Info("session journal compacted", "journal", jpath, "records", len(res.records), "clusters", len(s.index))
	}
	used := make(map[uint32]bool, len(s.index))
	for _, e := range s.index {
		if e.slot != noSlot {
			used[e.slot] = true
		}
	}
	s.slots = newSlotAllocator(used)
	// Slots past the last used one hold only versions that were never
	// committed: give their space back.
	if st, err := s.data.Stat(); err == nil && st.Size() > int64(s.slots.next)*cowformat.ClusterSize {
		if err := s.data.Truncate(int64(s.slots.next) * cowformat.ClusterSize); err != nil {
			return err
		}
	}
	s.j = newJournal(s.jf, s.data, end, nextSeq, s.durable, s.failed)
	return nil
}

// compact rewrites the journal with only the latest record of each
// cluster (keeping their sequence numbers and modification counts) and
// atomically replaces the old one. It returns the new end offset.
func (s *store) compact(records []journalRecord) (int64, error) {
	latest := make(map[uint32]journalRecord, len(s.index))
	for _, r := range records {
		latest[r.Cluster] = r
	}
	keep := make([]journalRecord, 0, len(latest))
	for _, r := range latest {
		keep = append(keep, r)
	}
	slices.SortFunc(keep, func(a, b journalRecord) int { return cmp.Compare(a.Seq, b.Seq) })
	buf := journalHeader()
	for i := range keep {
		buf = keep[i].appendTo(buf)
	}
	jpath := filepath.Join(s.dir, journalFileName)
	if err := fsutil.WriteFileAtomic(jpath, buf, 0o644); err != nil {
		return 0, fmt.Errorf("compact %s: %w", jpath, err)
	}
	jf, err := os.OpenFile(jpath, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	s.jf.Close()
	s.jf = jf
	return int64(len(buf)), nil
}

// close closes the store's files.
func (s *store) close() error {
	return errors.Join(s.data.Close(), s.jf.Close())
}

// put stores one cluster version durably (see the file comment).
// u must be validated. An upload of a cluster the session does not hold
// yet fails with ErrQuotaExceeded when the session holds maxClusters.
func (s *store) put(u *Update) error {
	if err := s.j.isBroken(); err != nil {
		return err
	}
	c := uint32(u.Cluster)
	if err := s.reserve(c); err != nil {
		return err
	}
	defer s.unreserve(c)
	rec := journalRecord{Cluster: uint32(u.Cluster), Slot: noSlot, Bitfield: u.Bitfield}
	if popcount(&u.Bitfield) > 0 {
		s.mu.Lock()
		rec.Slot = s.slots.alloc()
		s.mu.Unlock()
		crc, err := s.writeBlocks(rec.Slot, u)
		if err != nil {
			s.mu.Lock()
			s.slots.release(rec.Slot)
			s.mu.Unlock()
			return fmt.Errorf("write cluster %d to the session's data file: %w", u.Cluster, err)
		}
		rec.DataCRC = crc
	}
	return s.j.append(rec, s.assignMods)
}

// writeBlocks writes the set blocks of u packed into slot and returns
// their CRC-32C.
func (s *store) writeBlocks(slot uint32, u *Update) (uint32, error) {
	base := int64(slot) * cowformat.ClusterSize
	if !u.Full {
		if _, err := s.data.WriteAt(u.Blocks, base); err != nil {
			return 0, err
		}
		return crc32.Checksum(u.Blocks, castagnoli), nil
	}
	var crc uint32
	off := base
	for r := range bitRuns(&u.Bitfield) {
		p := u.Blocks[r.first*cowformat.BlockSize : (r.first+r.n)*cowformat.BlockSize]
		if _, err := s.data.WriteAt(p, off); err != nil {
			return 0, err
		}
		crc = crc32.Update(crc, castagnoli, p)
		off += int64(len(p))
	}
	return crc, nil
}

// reserve counts an upload of cluster c against the quota: a cluster
// that is neither stored nor being uploaded is refused once the session
// holds (or is receiving) maxClusters clusters. Re-uploads always pass:
// they replace a version. So the data file never holds more than
// maxClusters slots plus one per upload in progress.
func (s *store) reserve(c uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, stored := s.index[c]; !stored && s.inflight[c] == 0 {
		n := len(s.index)
		for nc := range s.newInflight {
			if _, stored := s.index[nc]; !stored {
				n++
			}
		}
		if n >= s.maxClusters {
			return fmt.Errorf("%w: the session holds %d clusters of %d bytes, its quota; re-uploads of these clusters are still accepted "+
				"(the merger's administrator can raise --session-quota)", ErrQuotaExceeded, n, cowformat.ClusterSize)
		}
		s.newInflight[c] = true
	}
	s.inflight[c]++
	return nil
}

// unreserve ends an upload that reserve admitted.
func (s *store) unreserve(c uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inflight[c]--; s.inflight[c] <= 0 {
		delete(s.inflight, c)
		delete(s.newInflight, c)
	}
}

// assignMods returns the modification count of a new record of cluster c
// (called under the journal's lock, in sequence order).
func (s *store) assignMods(c uint32) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.index[c].mods + s.pending[c] + 1
	s.pending[c]++
	return n
}

// durable installs committed records in the index and frees the slots
// of the versions they replace.
func (s *store) durable(recs []journalRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range recs {
		s.unpend(r.Cluster)
		if old, ok := s.index[r.Cluster]; ok {
			s.slots.release(old.slot)
		}
		s.index[r.Cluster] = r.entry()
	}
}

// failed forgets records whose batch failed. Their slots are reused
// unless the journal broke (then the records may be on disk after all).
func (s *store) failed(recs []journalRecord, broken bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range recs {
		s.unpend(r.Cluster)
		if !broken {
			s.slots.release(r.Slot)
		}
	}
}

func (s *store) unpend(c uint32) {
	if s.pending[c] <= 1 {
		delete(s.pending, c)
	} else {
		s.pending[c]--
	}
}

// clusters returns the number of clusters stored.
func (s *store) clusters() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.index)
}

// snapshot returns every cluster's current version, by cluster index.
func (s *store) snapshot() []clusterVersion {
	s.mu.Lock()
	out := make([]clusterVersion, 0, len(s.index))
	for c, e := range s.index {
		out = append(out, clusterVersion{cluster: c, slot: e.slot, crc: e.crc, bitfield: e.bitfield})
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b clusterVersion) int { return cmp.Compare(a.cluster, b.cluster) })
	return out
}

// storedBlocks returns the number of 4 KiB blocks of all current versions.
func (s *store) storedBlocks() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, e := range s.index {
		n += int64(popcount(&e.bitfield))
	}
	return n
}

// readVersion reads the packed blocks of v into buf (which must hold a
// cluster) and checks their CRC. It returns the blocks.
func (s *store) readVersion(v *clusterVersion, buf []byte) ([]byte, error) {
	n := popcount(&v.bitfield) * cowformat.BlockSize
	if n == 0 {
		return nil, nil
	}
	p := buf[:n]
	if _, err := s.data.ReadAt(p, int64(v.slot)*cowformat.ClusterSize); err != nil {
		return nil, fmt.Errorf("read cluster %d from slot %d of %s: %w", v.cluster, v.slot, s.data.Name(), err)
	}
	if got := crc32.Checksum(p, castagnoli); got != v.crc {
		return nil, fmt.Errorf("cluster %d: stored data is corrupt (CRC-32C %08x, journal says %08x) in slot %d of %s; "+
			"the upload was acknowledged intact, so the disk or file was damaged afterwards: "+
			"start a new session and upload the changes again", v.cluster, got, v.crc, v.slot, s.data.Name())
	}
	return p, nil
}

// topModified returns up to n clusters by modification count, the most
// modified first (ties by cluster index).
func (s *store) topModified(n int) []ClusterCount {
	s.mu.Lock()
	out := make([]ClusterCount, 0, len(s.index))
	for c, e := range s.index {
		out = append(out, ClusterCount{Cluster: int(c), Modifications: e.mods})
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b ClusterCount) int {
		if c := cmp.Compare(b.Modifications, a.Modifications); c != 0 {
			return c
		}
		return cmp.Compare(a.Cluster, b.Cluster)
	})
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// bitRun is a run of consecutive set bits.
type bitRun struct{ first, n int }

// bitRuns yields the runs of set bits of a bitfield, ascending.
func bitRuns(bf *[cowformat.BitfieldSize]byte) func(yield func(bitRun) bool) {
	return func(yield func(bitRun) bool) {
		for i := 0; i < cowformat.ClusterBlocks; {
			if bf[i/8]&(1<<(i%8)) == 0 {
				i++
				continue
			}
			j := i + 1
			for j < cowformat.ClusterBlocks && bf[j/8]&(1<<(j%8)) != 0 {
				j++
			}
			if !yield(bitRun{i, j - i}) {
				return
			}
			i = j
		}
	}
}
