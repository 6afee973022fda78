package merger

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"math/rand/v2"
	"os"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
	"golang.org/x/sys/unix"
)

// The CRC list of a merged revision: <name>.r<N+1>.crc in the reference's
// format (protocol.MarshalCRCList: the master CRC, then one CRC-32 per
// 16 MiB hash block of the 4 KiB-padded image), the same bytes
// `dnbd3-server --crc` writes. It is built in a temporary file beside the
// merge's temporary image (<temp>.crc), synced, and renamed into place
// before the image is (see merge.go), so a server never loads a merged
// revision without its list.
//
// A merge changes few hash blocks of a large image. A hash block that no
// uploaded block touched and whose bytes are those of the original (same
// range, no cut by the sizes) has the original's CRC: it is taken from
// <name>.r<N>.crc when that file exists, its master CRC checks out and it
// has one entry per hash block of the original. One of the blocks taken
// is recomputed as a spot check; if it differs, the old list does not
// describe the original and every block is computed.

// crcSuffix names the CRC list of an image file (<image>.crc), and the
// temporary list beside a merge's temporary image.
const crcSuffix = ".crc"

// crcSources says which hash blocks of a merge's result are the
// original's.
type crcSources struct {
	srcSize          int64 // the original file's size
	originalFileSize int64
	newFileSize      int64
	touched          []bool // hash blocks of the result an uploaded block was written to
}

// touch records that [off, off+n) of the result was written.
func (c *crcSources) touch(off, n int64) {
	end := min(off+n, c.newFileSize)
	if n <= 0 || off >= end {
		return
	}
	for hb := off / protocol.HashBlockSize; hb <= (end-1)/protocol.HashBlockSize && hb < int64(len(c.touched)); hb++ {
		c.touched[hb] = true
	}
}

func newCRCSources(srcSize, originalFileSize, newFileSize int64) *crcSources {
	return &crcSources{srcSize: srcSize, originalFileSize: originalFileSize, newFileSize: newFileSize,
		touched: make([]bool, protocol.HashBlockCount(protocol.VirtualSize(newFileSize)))}
}

// fromOriginal reports whether hash block hb of the result holds the
// same bytes as the original's (both 4 KiB-padded): not written by the
// merge, the same range in both, and not affected by the cut at
// min(originalFileSize, newFileSize) unless the original has no data
// beyond the cut.
func (c *crcSources) fromOriginal(hb int) bool {
	if hb >= len(c.touched) || c.touched[hb] {
		return false
	}
	start := int64(hb) * protocol.HashBlockSize
	end := min(start+protocol.HashBlockSize, protocol.VirtualSize(c.newFileSize))
	if end != min(start+protocol.HashBlockSize, protocol.VirtualSize(c.srcSize)) {
		return false
	}
	cut := min(c.originalFileSize, c.newFileSize)
	return end <= cut || cut >= c.srcSize
}

// crcStats says how a CRC list was made.
type crcStats struct {
	computed int  // hash blocks whose CRC was computed
	taken    int  // hash blocks whose CRC came from the original's list
	oldList  bool // the original's list was usable
}

// buildCRCList returns the CRC list of the result f (newFileSize bytes).
// old is the original's list (nil if none); spot picks the taken block
// to verify among n candidates.
func buildCRCList(f *os.File, c *crcSources, old []uint32, spot func(n int) int) ([]uint32, crcStats, error) {
	list := make([]uint32, len(c.touched))
	st := crcStats{oldList: old != nil}
	h := newHoleCRC(f, c.newFileSize)
	var taken []int
	for hb := range list {
		if old != nil && hb < len(old) && c.fromOriginal(hb) {
			list[hb] = old[hb]
			taken = append(taken, hb)
			continue
		}
		crc, err := h.block(hb)
		if err != nil {
			return nil, st, err
		}
		list[hb] = crc
		st.computed++
	}
	if len(taken) > 0 {
		hb := taken[spot(len(taken))]
		crc, err := h.block(hb)
		if err != nil {
			return nil, st, err
		}
		if crc != list[hb] {
			// The old list is not the original's: compute everything.
			full, err := h.all()
			return full, crcStats{computed: len(full), oldList: false}, err
		}
	}
	st.taken = len(taken)
	return list, st, nil
}

// holeCRC computes hash block CRCs of a file that may be sparse (a merge
// that grows an image leaves a hole): a block that is all hole is not
// read, its CRC is that of zeros.
type holeCRC struct {
	f       *os.File
	size    int64
	buf     []byte
	zeroCRC map[int64]uint32 // CRC of n zero bytes, by n
}

func newHoleCRC(f *os.File, size int64) *holeCRC {
	return &holeCRC{f: f, size: size, buf: make([]byte, 1<<20), zeroCRC: map[int64]uint32{}}
}

// block returns the CRC of hash block hb.
func (h *holeCRC) block(hb int) (uint32, error) {
	start := int64(hb) * protocol.HashBlockSize
	end := min(start+protocol.HashBlockSize, protocol.VirtualSize(h.size))
	if !h.hasData(start, min(end, h.size)) {
		n := end - start
		if c, ok := h.zeroCRC[n]; ok {
			return c, nil
		}
		clear(h.buf)
		var c uint32
		for left := n; left > 0; left -= int64(len(h.buf)) {
			c = crc32.Update(c, crc32.IEEETable, h.buf[:min(left, int64(len(h.buf)))])
		}
		h.zeroCRC[n] = c
		return c, nil
	}
	return protocol.BlockCRC(h.f, h.size, hb, h.buf)
}

// hasData reports whether [start, end) of the file may hold data (not
// only a hole); true where SEEK_DATA is not supported.
func (h *holeCRC) hasData(start, end int64) bool {
	if start >= end {
		return false
	}
	data, err := h.f.Seek(start, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return false // only a hole follows
	}
	return err != nil || data < end
}

// all returns the CRC of every hash block.
func (h *holeCRC) all() ([]uint32, error) {
	list := make([]uint32, protocol.HashBlockCount(protocol.VirtualSize(h.size)))
	for hb := range list {
		c, err := h.block(hb)
		if err != nil {
			return nil, err
		}
		list[hb] = c
	}
	return list, nil
}

// readOldCRCList reads the original's `.crc` for an original of srcSize
// bytes; nil if it is missing, unreadable, fails its master CRC or has
// the wrong number of entries (then every block is computed).
func readOldCRCList(path string, srcSize int64) ([]uint32, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	list, err := protocol.ParseCRCList(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if want := protocol.HashBlockCount(protocol.VirtualSize(srcSize)); len(list) != want {
		return nil, fmt.Errorf("merger: %s has %d entries, the original has %d hash blocks", path, len(list), want)
	}
	return list, nil
}

// writeCRCTemp computes the CRC list of the merge's synced result out and
// writes it to <p.temp>.crc, synced. It returns the file's identity.
func (m *Manager) writeCRCTemp(p *mergePlan, out *os.File) (fileID, crcStats, error) {
	old, err := readOldCRCList(p.src+".crc", p.crc.srcSize)
	if err != nil {
		m.log.Warn("ignoring the original's CRC list; computing every hash block", "session", p.uuid, "err", err)
		old = nil
	}
	list, st, err := buildCRCList(out, p.crc, old, rand.IntN)
	if err != nil {
		return fileID{}, st, fmt.Errorf("compute the CRC list: %w", err)
	}
	if old != nil && !st.oldList {
		m.log.Warn("the original's CRC list does not match the original (a recomputed hash block differs); computed every hash block",
			"session", p.uuid, "list", p.src+".crc")
	}
	path := p.temp + crcSuffix
	if err := fsutil.WriteFileSync(path, protocol.MarshalCRCList(list), os.O_TRUNC, 0o644); err != nil {
		return fileID{}, st, fmt.Errorf("write the CRC list: %w", err)
	}
	id, err := statID(path)
	return id, st, err
}
