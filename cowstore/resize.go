package cowstore

import (
	"fmt"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Resize changes the image size. Shrinking lowers validRemoteSize; growing
// zeroes the rest of the block at the old end (if local) and clears the
// bits of every block past the old end, so the grown range reads as zeros.
//
// A shrink is committed before Resize returns (and undone if that fails),
// so the committed size is never larger than the size in memory: a later
// grow or write past the end then only changes blocks that the committed
// header does not show (see doc.go).
func (o *Overlay) Resize(size int64) error {
	if err := o.usable(); err != nil {
		return err
	}
	if size < 0 || size > cowformat.MaxImageSize {
		return fmt.Errorf("%w: %d", ErrTooLarge, size)
	}
	o.sizeMu.Lock()
	defer o.sizeMu.Unlock()
	old, oldValid := o.imageSize.Load(), o.validSize.Load()
	switch {
	case size < old:
		o.validSize.Store(min(oldValid, size))
		o.imageSize.Store(size)
		o.markHeader()
		if err := o.commit(); err != nil {
			o.imageSize.Store(old)
			o.validSize.Store(oldValid)
			return fmt.Errorf("shrink the COW image to %d bytes: %w", size, err)
		}
	case size > old:
		if err := o.grow(old, size); err != nil {
			return err
		}
		o.imageSize.Store(size)
		o.markHeader()
	default:
		return nil
	}
	o.log.Info("COW image resized", "dir", o.dir, "from", old, "to", size, "validRemoteSize", o.validSize.Load())
	return nil
}

// grow clears local data past old up to new; the caller holds sizeMu
// exclusively.
func (o *Overlay) grow(old, new int64) error {
	first := int(old / cowformat.ClusterSize)
	last := int((new - 1) / cowformat.ClusterSize)
	for c := first; c <= last; {
		t := o.tables[c/cowformat.L2Entries].Load()
		if t == nil { // no table: nothing local in this whole L2 range
			c = (c/cowformat.L2Entries + 1) * cowformat.L2Entries
			continue
		}
		e := &t.entries[c%cowformat.L2Entries]
		mu := o.lockFor(c)
		mu.Lock()
		if e.offset >= 0 {
			from := 0
			if c == first {
				in := old % cowformat.ClusterSize
				from = int(in / cowformat.BlockSize)
				if tail := in % cowformat.BlockSize; tail != 0 {
					if e.has(from) {
						zeros := make([]byte, cowformat.BlockSize-tail)
						if _, err := o.data.WriteAt(zeros, e.offset+in); err != nil {
							mu.Unlock()
							return fmt.Errorf("zero the tail of the last block: %w", err)
						}
						o.touch(c, e)
					}
					from++ // the block at the old end keeps its head
				}
			}
			changed := false
			for b := from; b < cowformat.ClusterBlocks; b++ {
				if e.has(b) {
					e.clear(b)
					changed = true
				}
			}
			if changed {
				o.touch(c, e)
			}
		}
		mu.Unlock()
		c++
	}
	return nil
}
