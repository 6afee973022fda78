package merger

import (
	"container/heap"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// noSlot is the slot of a cluster version without blocks (an all-zero
// bitfield): it stores no data.
const noSlot = ^uint32(0)

// maxSlots bounds the slot numbers a journal record may carry: one per
// possible cluster plus room for versions in flight. It keeps a corrupt
// record from pointing the merge at an absurd offset.
const maxSlots = cowformat.MaxClusters + 1<<20

// slotAllocator hands out the slots of a session's data file. A slot is
// ClusterSize bytes at offset slot*ClusterSize; slot numbers are dense
// from 0, and the lowest free slot is reused first so that the data file
// stays as small as the number of live cluster versions allows.
//
// A slot is in use from alloc until the journal record of a newer version
// of the same cluster is durable (or, for an upload that failed, until
// release). Never handing out a slot that a durable latest record points
// at is what makes an upload crash-safe: the previous version stays
// intact until the new one is committed.
//
// slotAllocator is not safe for concurrent use; the store's mutex guards
// it.
type slotAllocator struct {
	free slotHeap // released slots below next
	next uint32   // slots >= next have never been handed out
}

// newSlotAllocator returns an allocator for a data file whose slots in
// used are taken (the slots of the latest records after a replay).
func newSlotAllocator(used map[uint32]bool) *slotAllocator {
	a := &slotAllocator{}
	for s := range used {
		if s+1 > a.next {
			a.next = s + 1
		}
	}
	for s := uint32(0); s < a.next; s++ {
		if !used[s] {
			a.free = append(a.free, s)
		}
	}
	heap.Init(&a.free)
	return a
}

// alloc returns a free slot.
func (a *slotAllocator) alloc() uint32 {
	if len(a.free) > 0 {
		return heap.Pop(&a.free).(uint32)
	}
	s := a.next
	a.next++
	return s
}

// release returns slot s to the free slots. noSlot is ignored.
func (a *slotAllocator) release(s uint32) {
	if s == noSlot {
		return
	}
	heap.Push(&a.free, s)
}

// inUse returns the number of slots handed out and not released.
func (a *slotAllocator) inUse() int { return int(a.next) - len(a.free) }

// slotHeap is a min-heap of slot numbers.
type slotHeap []uint32

func (h slotHeap) Len() int           { return len(h) }
func (h slotHeap) Less(i, j int) bool { return h[i] < h[j] }
func (h slotHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *slotHeap) Push(x any)        { *h = append(*h, x.(uint32)) }
func (h *slotHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
