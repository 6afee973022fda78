package cowstore

import (
	"fmt"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// forEachSlot calls fn for every cluster with a data slot, holding its
// lock for reading.
func (o *Overlay) forEachSlot(fn func(cluster int, e *entry)) {
	for l1 := range cowformat.L1Entries {
		t := o.tables[l1].Load()
		if t == nil {
			continue
		}
		for i := range t.entries {
			c := l1*cowformat.L2Entries + i
			mu := o.lockFor(c)
			mu.RLock()
			if e := &t.entries[i]; e.offset >= 0 {
				fn(c, e)
			}
			mu.RUnlock()
		}
	}
}

// DirtyClusters calls fn for every cluster with changes not yet uploaded.
func (o *Overlay) DirtyClusters(fn func(index int, changed int64)) {
	type d struct {
		c  int
		tc int64
	}
	var list []d
	o.forEachSlot(func(c int, e *entry) {
		if e.timeChanged != 0 {
			list = append(list, d{c, e.timeChanged})
		}
	})
	for _, x := range list {
		fn(x.c, x.tc)
	}
}

// Counts returns how many clusters with a slot are dirty and clean.
func (o *Overlay) Counts() (dirty, clean int) {
	o.forEachSlot(func(c int, e *entry) {
		if e.timeChanged != 0 {
			dirty++
		} else {
			clean++
		}
	})
	return
}

// Snapshot returns the cluster's bitfield, its local blocks in ascending
// order and its generation, consistent with each other. A failed session
// (see Failed) uploads nothing: pages the kernel dropped after the failed
// sync would read back stale.
func (o *Overlay) Snapshot(index int) (bits [cowformat.BitfieldSize]byte, blocks []byte, gen uint64, err error) {
	if err := o.Failed(); err != nil {
		return bits, nil, 0, err
	}
	e := o.lookup(index)
	if e == nil {
		return bits, nil, 0, fmt.Errorf("cowstore: cluster %d has no data", index)
	}
	mu := o.lockFor(index)
	mu.RLock()
	defer mu.RUnlock()
	if e.offset < 0 {
		return bits, nil, 0, fmt.Errorf("cowstore: cluster %d has no data", index)
	}
	bits, gen = e.bits, e.gen
	blocks = make([]byte, 0, e.popcount()*cowformat.BlockSize)
	for b := 0; b < cowformat.ClusterBlocks; {
		if !e.has(b) {
			b++
			continue
		}
		run := b
		for run < cowformat.ClusterBlocks && e.has(run) {
			run++
		}
		n := (run - b) * cowformat.BlockSize
		at := len(blocks)
		blocks = blocks[:at+n]
		if k, rerr := o.data.ReadAt(blocks[at:], e.offset+int64(b)*cowformat.BlockSize); k < n {
			return bits, nil, 0, fmt.Errorf("read cluster %d: %w", index, orEOF(rerr))
		}
		b = run
	}
	return bits, blocks, gen, nil
}

// MarkUploaded records a successful upload of generation gen.
func (o *Overlay) MarkUploaded(index int, gen uint64) bool {
	e := o.lookup(index)
	if e == nil {
		return false
	}
	mu := o.lockFor(index)
	mu.Lock()
	defer mu.Unlock()
	e.uploads++
	e.fails = 0
	clean := e.gen == gen
	if clean {
		e.timeChanged = 0
	}
	o.markDirty(index)
	return clean
}

// MarkFailed records a failed upload of generation gen.
func (o *Overlay) MarkFailed(index int, gen uint64) {
	e := o.lookup(index)
	if e == nil {
		return
	}
	mu := o.lockFor(index)
	mu.Lock()
	defer mu.Unlock()
	e.fails++
	if e.gen == gen && e.timeChanged != 0 {
		e.timeChanged = o.now().Unix()
	}
	o.markDirty(index)
}
