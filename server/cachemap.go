package server

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// CacheMap records which 4 KiB blocks of an incomplete (replicated) image
// are present in the local copy: bit k (byte k/8, bit k%8, LSB first) is
// block k. On disk it is the `.map` sidecar, ceil(virtual size / 32 KiB)
// bytes; no `.map` file means the image is complete. A short file leaves
// the missing tail absent.
type cacheMap struct {
	mu      sync.RWMutex
	bits    []byte
	blocks  int64
	present int64
	changed time.Time // last change not yet saved (zero: saved)
	failed  error     // a save failed: no more blocks are set or saved (Fail)
}

// NewCacheMap returns an empty map for an image of virtualSize bytes.
func newCacheMap(virtualSize int64) *cacheMap {
	blocks := (virtualSize + protocol.BlockSize - 1) / protocol.BlockSize
	return &cacheMap{bits: make([]byte, mapLen(virtualSize)), blocks: blocks}
}

// mapLen returns the length of the `.map` of an image of virtualSize
// bytes: one bit per 4 KiB block.
func mapLen(virtualSize int64) int64 {
	return (virtualSize + 8*protocol.BlockSize - 1) / (8 * protocol.BlockSize)
}

// LoadCacheMap reads a `.map` file for an image of virtualSize bytes.
func loadCacheMap(path string, virtualSize int64) (*cacheMap, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := newCacheMap(virtualSize)
	m.replace(b)
	return m, nil
}

// trimTail clears bits past the last block.
func (m *cacheMap) trimTail() {
	if rem := m.blocks % 8; rem != 0 && len(m.bits) > 0 {
		m.bits[len(m.bits)-1] &= byte(1<<rem) - 1
	}
}

// Blocks returns the number of 4 KiB blocks the map covers.
func (m *cacheMap) Blocks() int64 { return m.blocks }

func blockRange(start, end int64) (int64, int64) {
	return start / protocol.BlockSize, (end + protocol.BlockSize - 1) / protocol.BlockSize
}

// Has reports whether every block touching [start, end) is present.
func (m *cacheMap) has(start, end int64) bool {
	first, last := blockRange(start, end)
	m.mu.RLock()
	defer m.mu.RUnlock()
	for b := first; b < last && b < m.blocks; b++ {
		if m.bits[b/8]&(1<<(b%8)) == 0 {
			return false
		}
	}
	return true
}

// Missing returns the runs of absent blocks touching [start, end), as
// 4 KiB-aligned byte ranges [from, to).
func (m *cacheMap) missing(start, end int64) [][2]int64 {
	first, last := blockRange(start, end)
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out [][2]int64
	for b := first; b < last && b < m.blocks; b++ {
		if m.bits[b/8]&(1<<(b%8)) != 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1][1] == b*protocol.BlockSize {
			out[n-1][1] += protocol.BlockSize
		} else {
			out = append(out, [2]int64{b * protocol.BlockSize, (b + 1) * protocol.BlockSize})
		}
	}
	return out
}

// Clear marks the blocks touching [start, end) absent (a failed hash
// check: they are fetched again).
func (m *cacheMap) clear(start, end int64) {
	first, last := blockRange(start, end)
	m.mu.Lock()
	defer m.mu.Unlock()
	for b := first; b < last && b < m.blocks; b++ {
		if m.bits[b/8]&(1<<(b%8)) != 0 {
			m.bits[b/8] &^= 1 << (b % 8)
			m.present--
			if m.changed.IsZero() {
				m.changed = time.Now()
			}
		}
	}
}

// Complete reports whether every block is present.
func (m *cacheMap) complete() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.present == m.blocks
}

// Percent returns the share of present blocks as the RPC's integer
// percentage (rounded down, 100 only when complete).
func (m *cacheMap) percent() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.blocks == 0 || m.present == m.blocks {
		return 100
	}
	return int(m.present * 100 / m.blocks)
}

// Present returns the number of present blocks.
func (m *cacheMap) Present() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.present
}

// Bytes returns a copy of the map as the `.map` file and /cachemap hold it.
func (m *cacheMap) bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.bits...)
}

// Unsaved reports since when the map has changes not yet saved.
func (m *cacheMap) unsaved() (since time.Time, dirty bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.changed, !m.changed.IsZero()
}

// Save writes the map to path atomically (temporary file, fsync, rename).
// The caller must have synced the image data the map describes first, so
// a crash never leaves bits set over data that is not on disk.
func (m *cacheMap) save(path string) error {
	return m.saveSynced(func() error { return nil }, atomicMapWriter(path))
}

// AtomicMapWriter returns the write function of SaveSynced that replaces
// the `.map` at path atomically and durably (temporary file, fsync,
// rename, directory fsync).
func atomicMapWriter(path string) func([]byte) error {
	return func(b []byte) error { return fsutil.WriteFileAtomic(path, b, 0o644) }
}

// WriteMeta writes the `.meta` sidecar with the last access time, which
// the proxy's LRU deletion of replicated images uses.
func writeMeta(imagePath string, atime time.Time) error {
	return fsutil.WriteFileAtomic(imagePath+".meta", []byte("[main]\natime="+strconv.FormatInt(atime.Unix(), 10)+"\n"), 0o644)
}

// ReadMeta reads the last access time from a `.meta` sidecar; without one
// the image file's mtime counts.
func readMeta(imagePath string) (time.Time, error) {
	atime, err := readMetaFile(imagePath)
	if errors.Is(err, os.ErrNotExist) {
		st, err := os.Stat(imagePath)
		if err != nil {
			return time.Time{}, err
		}
		return st.ModTime(), nil
	}
	return atime, err
}

// readMetaFile reads the last access time from imagePath's `.meta`; an
// error satisfying errors.Is(err, os.ErrNotExist) means there is none.
func readMetaFile(imagePath string) (time.Time, error) {
	var atime time.Time
	b, err := os.ReadFile(imagePath + ".meta")
	if err != nil {
		return atime, err
	}
	found := false
	parseINI(bytes.NewReader(b), func(section, key, value string, _ int) {
		if section == "main" && key == "atime" {
			if n, err := strconv.ParseInt(value, 10, 64); err == nil {
				atime, found = time.Unix(n, 0), true
			}
		}
	})
	if !found {
		return atime, fmt.Errorf("server: %s.meta: no atime", imagePath)
	}
	return atime, nil
}

// blocksPerHashBlock is the number of 4 KiB blocks in a 16 MiB hash block;
// in the map a hash block is 512 consecutive bytes.
const blocksPerHashBlock = protocol.HashBlockSize / protocol.BlockSize

// NewFullCacheMap returns a map with every block present: the starting
// point when a hash block of a complete image fails its check and has to
// be fetched again.
func newFullCacheMap(virtualSize int64) *cacheMap {
	m := newCacheMap(virtualSize)
	for i := range m.bits {
		m.bits[i] = 0xFF
	}
	m.trimTail()
	m.present = m.blocks
	return m
}

// SetRange marks the blocks fully inside [start, end) present (nothing
// after Fail). It reports whether this call completed the map and which
// 16 MiB hash blocks it completed (they had a block set by this call and
// are now fully present), so each is CRC-checked exactly once.
func (m *cacheMap) setRange(start, end int64) (completed bool, hashBlocks []int) {
	first := (start + protocol.BlockSize - 1) / protocol.BlockSize
	last := min(end/protocol.BlockSize, m.blocks)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failed != nil {
		return false, nil // nothing written now can be made durable
	}
	touched := -1
	for b := first; b < last; b++ {
		if m.bits[b/8]&(1<<(b%8)) != 0 {
			continue
		}
		m.bits[b/8] |= 1 << (b % 8)
		m.present++
		if m.changed.IsZero() {
			m.changed = time.Now()
		}
		if hb := int(b / blocksPerHashBlock); hb != touched {
			touched = hb
			hashBlocks = append(hashBlocks, hb)
		}
	}
	done := hashBlocks[:0]
	for _, hb := range hashBlocks {
		if m.hashBlockCompleteLocked(hb) {
			done = append(done, hb)
		}
	}
	return len(hashBlocks) > 0 && m.present == m.blocks, done
}

// hashBlockRange returns the map blocks [first, last) of hash block hb.
func (m *cacheMap) hashBlockRange(hb int) (int64, int64) {
	first := int64(hb) * blocksPerHashBlock
	return first, min(first+blocksPerHashBlock, m.blocks)
}

// fullByte is the value of map byte i when all its blocks are present
// (the last byte may cover fewer than 8 blocks).
func (m *cacheMap) fullByte(i int) byte {
	if i == len(m.bits)-1 {
		if rem := m.blocks % 8; rem != 0 {
			return byte(1<<rem) - 1
		}
	}
	return 0xFF
}

// hashBlockPresentLocked counts the present blocks of hash block hb and
// returns it with the hash block's number of blocks.
func (m *cacheMap) hashBlockPresentLocked(hb int) (present, total int64) {
	first, last := m.hashBlockRange(hb)
	if first >= last {
		return 0, 0
	}
	// hash blocks start on byte boundaries (4096 blocks = 512 bytes)
	for i := first / 8; i < (last+7)/8; i++ {
		present += int64(bits.OnesCount8(m.bits[i]))
	}
	return present, last - first
}

func (m *cacheMap) hashBlockCompleteLocked(hb int) bool {
	p, n := m.hashBlockPresentLocked(hb)
	return n > 0 && p == n
}

// HashBlockComplete reports whether every block of 16 MiB hash block hb
// is present.
func (m *cacheMap) hashBlockComplete(hb int) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.hashBlockCompleteLocked(hb)
}

// NextChunk returns the index of the first map byte at or after from
// (wrapping around once) whose 32 KiB are not all present; with
// partialOnly, only bytes inside 16 MiB hash blocks that are partially
// present count (backgroundReplication=hashblock). ok is false if there is
// none.
func (m *cacheMap) nextChunk(from int64, partialOnly bool) (idx int64, ok bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	n := int64(len(m.bits))
	if n == 0 || m.present == m.blocks {
		return 0, false
	}
	from = ((from % n) + n) % n
	const bytesPerHashBlock = blocksPerHashBlock / 8
	curHB, curPartial := int64(-1), false
	for k := int64(0); k < n; k++ {
		i := (from + k) % n
		if m.bits[i] == m.fullByte(int(i)) {
			continue
		}
		if partialOnly {
			hb := i / bytesPerHashBlock
			if hb != curHB {
				curHB = hb
				p, total := m.hashBlockPresentLocked(int(hb))
				curPartial = p > 0 && p < total
			}
			if !curPartial {
				// skip to the end of this hash block
				k += (hb+1)*bytesPerHashBlock - i - 1
				continue
			}
		}
		return i, true
	}
	return 0, false
}

// SaveSynced writes the map like Save, with write, but calls sync (which
// must make the image data durable, e.g. fdatasync of the image file)
// after taking the copy it writes and before writing it: every bit on disk
// then describes data that reached the disk first, even while blocks keep
// arriving.
//
// A failure is not retried into a success: after an fsync error the
// kernel may have dropped the dirty pages and a later fsync reports
// nothing ("fsyncgate"). The caller makes it permanent with Fail; until
// then the changes stay unsaved.
func (m *cacheMap) saveSynced(sync func() error, write func([]byte) error) error {
	m.mu.Lock()
	if m.failed != nil {
		m.mu.Unlock()
		return fmt.Errorf("an earlier save failed, the cache map is no longer saved: %w", m.failed)
	}
	b := append([]byte(nil), m.bits...)
	changed := m.changed
	m.changed = time.Time{}
	m.mu.Unlock()
	err := sync()
	if err == nil {
		err = write(b)
	}
	if err != nil {
		m.mu.Lock()
		if m.changed.IsZero() {
			m.changed = changed
		}
		m.mu.Unlock()
		return err
	}
	return nil
}

// Fail makes a failed save permanent: the map keeps only the blocks that
// saved (the `.map` on disk, the last successful save; nil if unreadable)
// also has, since only those are known to be durable; it forgets its
// unsaved changes, SetRange sets no more blocks and every later save
// returns err. Clearing blocks still works (saying less is always safe).
func (m *cacheMap) fail(err error, saved []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failed == nil {
		m.failed = err
	}
	m.present = 0
	for i := range m.bits {
		var d byte
		if i < len(saved) {
			d = saved[i]
		}
		m.bits[i] &= d
		m.present += int64(bits.OnesCount8(m.bits[i]))
	}
	m.changed = time.Time{}
}

// Replace loads the bits of a `.map` file read again from disk (a server
// that is not the replicating party follows the one that is).
func (m *cacheMap) replace(b []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.bits)
	copy(m.bits, b)
	m.trimTail()
	m.present = 0
	for _, x := range m.bits {
		m.present += int64(bits.OnesCount8(x))
	}
}
