package cowstore

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Flush makes every write that completed before the call durable (the NBD
// FLUSH command).
func (o *Overlay) Flush() error {
	if o.closed.Load() {
		return ErrClosed
	}
	return o.Commit()
}

// Commit makes the metadata durable in the order doc.go explains: data
// fdatasync; L2 tables, entries and L1 (which nothing reachable from the
// committed header points to yet); meta fdatasync; the header; meta
// fdatasync. Entries are copied before the data sync, so they only
// reference blocks whose data was written before; allocation counters and
// L1 are copied after the entries, so they cover every slot and table the
// entries use. A failed sync fails the session for good (see Failed).
func (o *Overlay) Commit() error {
	if o.closed.Load() {
		return ErrClosed
	}
	return o.commit()
}

// metaWrite is one piece of metadata to write.
type metaWrite struct {
	off int64
	b   []byte
}

func (o *Overlay) commit() error {
	o.commitMu.Lock()
	defer o.commitMu.Unlock()
	if err := o.Failed(); err != nil {
		return err
	}

	o.dirtyMu.Lock()
	dirty, newTables, l1Dirty, head := o.dirty, o.newTables, o.l1Dirty, o.headDirty
	o.dirty, o.newTables, o.l1Dirty, o.headDirty = map[int]struct{}{}, map[int]struct{}{}, false, false
	o.dirtyMu.Unlock()
	if len(dirty) == 0 && len(newTables) == 0 && !l1Dirty && !head {
		return nil
	}
	requeue := func() {
		o.dirtyMu.Lock()
		for c := range dirty {
			o.dirty[c] = struct{}{}
		}
		for t := range newTables {
			o.newTables[t] = struct{}{}
		}
		o.l1Dirty = o.l1Dirty || l1Dirty
		o.headDirty = true
		o.dirtyMu.Unlock()
	}

	var writes []metaWrite
	// whole new tables (their entries are copied under the locks)
	for l1 := range newTables {
		t := o.tables[l1].Load()
		b := make([]byte, cowformat.L2TableSize)
		for i := range t.entries {
			c := l1*cowformat.L2Entries + i
			mu := o.lockFor(c)
			mu.RLock()
			t.entries[i].marshalTo(b[i*cowformat.L2EntrySize:])
			mu.RUnlock()
			delete(dirty, c)
		}
		writes = append(writes, metaWrite{metaOffset(t.index, 0), b})
	}
	for c := range dirty {
		t := o.tables[c/cowformat.L2Entries].Load()
		b := make([]byte, cowformat.L2EntrySize)
		mu := o.lockFor(c)
		mu.RLock()
		t.entries[c%cowformat.L2Entries].marshalTo(b)
		mu.RUnlock()
		writes = append(writes, metaWrite{metaOffset(t.index, c%cowformat.L2Entries), b})
	}
	// L1 and the header, after the entries
	o.allocMu.Lock()
	h := header{
		imageSize:         uint64(o.imageSize.Load()),
		validRemoteSize:   uint64(o.validSize.Load()),
		nextL2:            o.nextL2,
		nextClusterOffset: o.nextSlot,
	}
	if len(newTables) > 0 || l1Dirty {
		l1 := make([]byte, cowformat.L1Entries*4)
		for i := range cowformat.L1Entries {
			v := int32(-1)
			// only tables that are (or are now being) written to meta
			if t := o.tables[i].Load(); t != nil {
				if _, isNew := newTables[i]; isNew || o.tableSaved[i] {
					v = t.index
				}
			}
			le.PutUint32(l1[4*i:], uint32(v))
		}
		writes = append(writes, metaWrite{cowformat.StartL1, l1})
	}
	o.allocMu.Unlock()
	o.hdrMu.Lock()
	h.uuid, h.imageName, h.creationTime = o.uuid, o.imageName, o.created
	o.hdrMu.Unlock()
	hdr := h.marshal()

	// 1. the data the entries point to
	if err := o.data.Datasync(); err != nil {
		return o.fail("fdatasync of the data file", err)
	}
	// 2. tables, entries, L1: invisible until the header below covers them
	if len(writes) > 0 {
		if err := o.writeMeta(writes); err != nil {
			requeue()
			return err
		}
		if err := o.meta.Datasync(); err != nil {
			return o.fail("fdatasync of the meta file", err)
		}
	}
	// 3. the header (one sector), which makes them valid
	if !bytes.Equal(hdr, o.savedHeader) {
		if _, err := o.meta.WriteAt(hdr, 0); err != nil {
			requeue()
			return fmt.Errorf("write COW metadata header: %w", err)
		}
		if err := o.meta.Datasync(); err != nil {
			return o.fail("fdatasync of the meta file", err)
		}
		o.savedHeader = hdr
	}
	for l1 := range newTables {
		o.tableSaved[l1] = true
	}
	return nil
}

// writeMeta writes the pieces in file order, coalescing adjacent ones.
func (o *Overlay) writeMeta(writes []metaWrite) error {
	slices.SortFunc(writes, func(a, b metaWrite) int { return cmp.Compare(a.off, b.off) })
	for i := 0; i < len(writes); {
		j, buf := i+1, writes[i].b
		for j < len(writes) && writes[j].off == writes[i].off+int64(len(buf)) {
			buf = append(buf, writes[j].b...)
			j++
		}
		if _, err := o.meta.WriteAt(buf, writes[i].off); err != nil {
			return fmt.Errorf("write COW metadata: %w", err)
		}
		i = j
	}
	return nil
}
