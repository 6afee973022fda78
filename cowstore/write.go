package cowstore

import (
	"errors"
	"fmt"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// ErrTooLarge is returned for writes and resizes beyond 10^12 bytes, the
// largest image the session format addresses.
var ErrTooLarge = errors.New("cowstore: beyond the maximum image size of 10^12 bytes")

// WriteAt writes p at off into the session. Partial 4 KiB blocks are
// completed from the remote image (read-modify-write). A write past the end
// grows the image first, as the reference does.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if err := o.usable(); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("cowstore: negative offset %d", off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	if end > cowformat.MaxImageSize {
		return 0, ErrTooLarge
	}
	o.sizeMu.RLock()
	if end <= o.imageSize.Load() {
		err := o.write(p, off)
		o.sizeMu.RUnlock()
		if err != nil {
			return 0, err
		}
		return len(p), nil
	}
	o.sizeMu.RUnlock()
	o.sizeMu.Lock()
	defer o.sizeMu.Unlock()
	if size := o.imageSize.Load(); off > size {
		if err := o.grow(size, off); err != nil {
			return 0, err
		}
		o.imageSize.Store(off)
	}
	if err := o.write(p, off); err != nil {
		return 0, err
	}
	if end > o.imageSize.Load() {
		o.imageSize.Store(end)
		o.markHeader()
	}
	return len(p), nil
}

// WriteAtFUA writes and commits before returning (NBD FUA).
func (o *Overlay) WriteAtFUA(p []byte, off int64) (int, error) {
	n, err := o.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, o.Commit()
}

// WriteZeroes writes zeros; clusters that already read as zero (no local
// data, above the valid remote size) are left alone.
func (o *Overlay) WriteZeroes(off, length int64, noHole bool) error {
	if err := o.usable(); err != nil {
		return err
	}
	zero := make([]byte, min(length, cowformat.ClusterSize))
	for length > 0 {
		n := min(length, cowformat.ClusterSize-off%cowformat.ClusterSize)
		skip := false
		if !noHole && off >= o.ValidRemoteSize() && off+n <= o.Size() {
			e := o.lookup(int(off / cowformat.ClusterSize))
			skip = e == nil || o.slotOf(int(off/cowformat.ClusterSize), e) < 0
		}
		if !skip {
			if _, err := o.WriteAt(zero[:n], off); err != nil {
				return err
			}
		}
		off += n
		length -= n
	}
	return nil
}

func (o *Overlay) slotOf(cluster int, e *entry) int64 {
	mu := o.lockFor(cluster)
	mu.RLock()
	defer mu.RUnlock()
	return e.offset
}

// write does the work of WriteAt inside the image; the caller holds sizeMu
// (shared or exclusive), so sizes and cleared bits cannot change.
func (o *Overlay) write(p []byte, off int64) error {
	valid := o.validSize.Load()
	for pos := 0; pos < len(p); {
		abs := off + int64(pos)
		cluster := int(abs / cowformat.ClusterSize)
		in := abs % cowformat.ClusterSize
		n := min(len(p)-pos, int(cowformat.ClusterSize-in))
		if err := o.writeCluster(cluster, in, p[pos:pos+n], valid); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

// partial is a block that a write covers only in part.
type partial struct {
	block      int    // block number in the cluster
	from, to   int    // written byte range inside the block
	src        []byte // the written bytes
	remote     []byte // the block's remote bytes (nil: fetch none / zeros)
	wasLocal   bool
	blockStart int64
}

func (o *Overlay) writeCluster(cluster int, in int64, p []byte, valid int64) error {
	first := int(in / cowformat.BlockSize)
	last := int((in + int64(len(p)) - 1) / cowformat.BlockSize)
	parts := partialBlocks(int64(cluster)*cowformat.ClusterSize, in, p)
	// Fetch remote bytes for partial blocks that are not local, without
	// holding the cluster lock (the network may be slow).
	mu := o.lockFor(cluster)
	if err := o.fetchPartials(cluster, parts, valid); err != nil {
		return err
	}
	mu.Lock()
	defer mu.Unlock()
	e := o.entryFor(cluster)
	o.allocSlot(e)
	for i := range parts {
		if err := o.writePartial(cluster, e, &parts[i]); err != nil {
			return err
		}
	}
	// the fully covered blocks, as one write
	fb, lb := first, last
	if len(parts) > 0 && parts[0].block == first {
		fb++
	}
	if len(parts) > 0 && parts[len(parts)-1].block == last {
		lb--
	}
	if fb <= lb {
		start := int64(fb)*cowformat.BlockSize - in
		end := int64(lb+1)*cowformat.BlockSize - in
		if _, err := o.data.WriteAt(p[start:end], e.offset+int64(fb)*cowformat.BlockSize); err != nil {
			return fmt.Errorf("write data: %w", err)
		}
		for b := fb; b <= lb; b++ {
			e.set(b)
		}
	}
	o.touch(cluster, e)
	return nil
}

// partialBlocks returns the first and last blocks of a write of p at
// offset in (within the cluster starting at base) when p covers them only
// in part.
func partialBlocks(base, in int64, p []byte) []partial {
	first := int(in / cowformat.BlockSize)
	last := int((in + int64(len(p)) - 1) / cowformat.BlockSize)
	var parts []partial
	add := func(b int) {
		bs := int64(b) * cowformat.BlockSize
		from := max(0, int(in-bs))
		to := min(cowformat.BlockSize, int(in+int64(len(p))-bs))
		if from == 0 && to == cowformat.BlockSize {
			return
		}
		parts = append(parts, partial{block: b, from: from, to: to,
			src: p[int(bs+int64(from)-in):int(bs+int64(to)-in)], blockStart: base + bs})
	}
	add(first)
	if last != first {
		add(last)
	}
	return parts
}

// fetchPartials reads the remote image's bytes of the partial blocks that
// are not local (zeros past valid).
func (o *Overlay) fetchPartials(cluster int, parts []partial, valid int64) error {
	mu := o.lockFor(cluster)
	e0 := o.lookup(cluster)
	for i := range parts {
		pt := &parts[i]
		if e0 != nil {
			mu.RLock()
			pt.wasLocal = e0.offset >= 0 && e0.has(pt.block)
			mu.RUnlock()
		}
		if pt.wasLocal {
			continue
		}
		pt.remote = make([]byte, cowformat.BlockSize)
		if n := min(valid-pt.blockStart, cowformat.BlockSize); n > 0 {
			if k, err := o.remote.ReadAt(pt.remote[:n], pt.blockStart); int64(k) < n {
				return fmt.Errorf("read-modify-write of block at %d: remote read: %w", pt.blockStart, orEOF(err))
			}
		}
	}
	return nil
}

// writePartial writes one partial block into cluster's slot (the cluster
// lock is held): patched in place when the block is local, else merged
// with the fetched remote bytes and marked local.
func (o *Overlay) writePartial(cluster int, e *entry, pt *partial) error {
	at := e.offset + int64(pt.block)*cowformat.BlockSize
	if e.has(pt.block) {
		// local (maybe since a concurrent write): patch it in place
		if _, err := o.data.WriteAt(pt.src, at+int64(pt.from)); err != nil {
			return fmt.Errorf("write data: %w", err)
		}
		return nil
	}
	blk := pt.remote
	if blk == nil { // was local when checked: cannot be cleared meanwhile
		return fmt.Errorf("cowstore: internal error: block %d of cluster %d lost its bit", pt.block, cluster)
	}
	copy(blk[pt.from:pt.to], pt.src)
	if _, err := o.data.WriteAt(blk, at); err != nil {
		return fmt.Errorf("write data: %w", err)
	}
	e.set(pt.block)
	return nil
}
