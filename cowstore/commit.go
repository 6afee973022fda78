package cowstore

import (
	"cmp"
	"fmt"
	"slices"
)

// Flush makes every write that completed before the call durable (the NBD
// FLUSH command).
func (o *Overlay) Flush() error {
	if o.closed.Load() {
		return ErrClosed
	}
	return o.Commit()
}

// Commit writes the dirty metadata in order: data first (fdatasync), then
// the L2 entries, new L2 tables, L1 and header that point at it, then
// fdatasync of meta. Entries are copied before the data sync, so they only
// reference blocks whose data was written before; allocation counters and
// L1 are copied after the entries, so they cover every slot and table the
// entries use.
func (o *Overlay) Commit() error {
	if o.closed.Load() {
		return ErrClosed
	}
	return o.commit()
}

func (o *Overlay) commit() error {
	o.commitMu.Lock()
	defer o.commitMu.Unlock()

	o.dirtyMu.Lock()
	dirty, newTables, head := o.dirty, o.newTables, o.headDirty
	o.dirty, o.newTables, o.headDirty = map[int]struct{}{}, map[int]struct{}{}, false
	o.dirtyMu.Unlock()
	if len(dirty) == 0 && len(newTables) == 0 && !head {
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
		o.headDirty = true
		o.dirtyMu.Unlock()
	}

	type write struct {
		off int64
		b   []byte
	}
	var writes []write
	// whole new tables first (their entries are copied under the locks)
	for l1 := range newTables {
		t := o.tables[l1].Load()
		b := make([]byte, L2TableSize)
		for i := range t.entries {
			c := l1*L2Entries + i
			mu := o.lockFor(c)
			mu.RLock()
			t.entries[i].marshalTo(b[i*L2EntrySize:])
			mu.RUnlock()
			delete(dirty, c)
		}
		writes = append(writes, write{metaOffset(t.index, 0), b})
	}
	for c := range dirty {
		t := o.tables[c/L2Entries].Load()
		b := make([]byte, L2EntrySize)
		mu := o.lockFor(c)
		mu.RLock()
		t.entries[c%L2Entries].marshalTo(b)
		mu.RUnlock()
		writes = append(writes, write{metaOffset(t.index, c%L2Entries), b})
	}
	// header and L1, after the entries
	o.allocMu.Lock()
	h := header{
		imageSize:         uint64(o.imageSize.Load()),
		validRemoteSize:   uint64(o.validSize.Load()),
		nextL2:            o.nextL2,
		nextClusterOffset: o.nextSlot,
	}
	l1 := make([]byte, L1Entries*4)
	for i := range L1Entries {
		v := int32(-1)
		// only tables that are (or are now being) written to meta
		if t := o.tables[i].Load(); t != nil {
			if _, isNew := newTables[i]; isNew || o.tableSaved[i] {
				v = t.index
			}
		}
		le.PutUint32(l1[4*i:], uint32(v))
	}
	o.allocMu.Unlock()
	o.hdrMu.Lock()
	h.uuid, h.imageName, h.creationTime = o.uuid, o.imageName, o.created
	o.hdrMu.Unlock()
	writes = append(writes, write{0, append(h.marshal(), l1...)})

	if err := fdatasync(o.data); err != nil {
		requeue()
		return fmt.Errorf("sync COW data: %w", err)
	}
	slices.SortFunc(writes, func(a, b write) int { return cmp.Compare(a.off, b.off) })
	for i := 0; i < len(writes); {
		// coalesce adjacent writes into one pwrite
		j, buf := i+1, writes[i].b
		for j < len(writes) && writes[j].off == writes[i].off+int64(len(buf)) {
			buf = append(buf, writes[j].b...)
			j++
		}
		if _, err := o.meta.WriteAt(buf, writes[i].off); err != nil {
			requeue()
			return fmt.Errorf("write COW metadata: %w", err)
		}
		i = j
	}
	if err := fdatasync(o.meta); err != nil {
		requeue()
		return fmt.Errorf("sync COW metadata: %w", err)
	}
	for l1 := range newTables {
		o.tableSaved[l1] = true
	}
	return nil
}
