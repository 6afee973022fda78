package cowstore

import (
	"slices"
	"sync"
	"sync/atomic"
)

// Read-ahead of the remote image for sequential readers.
//
// A reader that waits for each read before it sends the next (dd with
// O_DIRECT, a verify pass, qemu with cache=none) leaves the remote link
// idle while it processes what it got. When remote reads follow each other
// through the image, readAhead fetches the next segments in the
// background, so the next read finds them ready. Random reads are passed
// through unchanged: they are never enlarged and never cached.
//
// The remote image is read-only, so fetched bytes never go stale. Memory
// is bounded: at most raSegments segments of raSegment bytes, of which at
// most raAhead are being fetched at a time.
const (
	raSegment  = 1 << 20       // segment size, and alignment
	raAhead    = 2             // segments fetched ahead of a sequential reader
	raSegments = 4             // segments kept (fetched or being fetched)
	raWindow   = 2 * raSegment // how close to the last read a sequential one starts
)

// segment is one aligned piece of the remote image, fetched in the
// background.
type segment struct {
	index int64         // offset / raSegment
	buf   []byte        // the bytes; valid once done is closed and ok is set
	ok    bool          // the fetch read the whole segment
	done  chan struct{} // closed when the fetch ended
}

// readAhead wraps a Remote.
type readAhead struct {
	r    Remote
	size int64 // of the remote image

	mu      sync.Mutex
	segs    []*segment // oldest first; at most raSegments
	lastEnd int64      // the furthest end of the current sequential run (-1: none)

	// counters for tests and status
	fetched, hits atomic.Uint64
}

func newReadAhead(r Remote) *readAhead {
	return &readAhead{r: r, size: r.Size(), lastEnd: -1}
}

// Size is the remote image's size.
func (ra *readAhead) Size() int64 { return ra.r.Size() }

// ReadAt reads p from off: pieces held in fetched segments are copied,
// the rest is read from the remote image (consecutive pieces in one read).
// A sequential read then starts fetching the segments after it.
func (ra *readAhead) ReadAt(p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	ra.mu.Lock()
	// sequential: it starts within raWindow of the furthest end of the
	// reads before it (the pieces of a request the kernel split may
	// arrive in either order)
	seq := ra.lastEnd >= 0 && off > ra.lastEnd-raWindow && off < ra.lastEnd+raWindow
	if !seq || end > ra.lastEnd {
		ra.lastEnd = end
	}
	ra.mu.Unlock()
	if seq && len(p) > 0 {
		ra.fetchAfter(end)
	}
	return ra.read(p, off)
}

// read serves p from the segments where it can and from the remote image
// elsewhere.
func (ra *readAhead) read(p []byte, off int64) (int, error) {
	pendAt, pendN := 0, 0 // a run of p still to read from the remote image
	flush := func() error {
		if pendN == 0 {
			return nil
		}
		n, err := ra.r.ReadAt(p[pendAt:pendAt+pendN], off+int64(pendAt))
		if n < pendN {
			return orEOF(err)
		}
		pendN = 0
		return nil
	}
	for pos := 0; pos < len(p); {
		abs := off + int64(pos)
		idx := abs / raSegment
		n := min(len(p)-pos, int((idx+1)*raSegment-abs))
		if s := ra.lookup(idx); s != nil {
			<-s.done
			if s.ok {
				if err := flush(); err != nil {
					return 0, err
				}
				copy(p[pos:pos+n], s.buf[abs-idx*raSegment:])
				ra.hits.Add(1)
				pos += n
				continue
			}
		}
		if pendN == 0 {
			pendAt = pos
		}
		pendN += n
		pos += n
	}
	if err := flush(); err != nil {
		return 0, err
	}
	return len(p), nil
}

// lookup returns the segment idx if it is held.
func (ra *readAhead) lookup(idx int64) *segment {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	return ra.lookupLocked(idx)
}

func (ra *readAhead) lookupLocked(idx int64) *segment {
	for _, s := range ra.segs {
		if s.index == idx {
			return s
		}
	}
	return nil
}

// fetchAfter starts fetching the raAhead segments after the one holding
// byte end-1 that are not held yet, evicting the oldest finished ones.
func (ra *readAhead) fetchAfter(end int64) {
	first := (end-1)/raSegment + 1
	ra.mu.Lock()
	defer ra.mu.Unlock()
	for idx := first; idx < first+raAhead && idx*raSegment < ra.size; idx++ {
		if ra.lookupLocked(idx) != nil || !ra.evictLocked() {
			continue
		}
		s := &segment{index: idx, done: make(chan struct{})}
		ra.segs = append(ra.segs, s)
		ra.fetched.Add(1)
		go ra.fetch(s)
	}
}

// evictLocked makes room for one more segment, dropping the oldest
// finished one if all places are taken. It reports false if every held
// segment is still being fetched.
func (ra *readAhead) evictLocked() bool {
	if len(ra.segs) < raSegments {
		return true
	}
	for i, s := range ra.segs {
		select {
		case <-s.done:
			ra.segs = append(ra.segs[:i], ra.segs[i+1:]...)
			return true
		default:
		}
	}
	return false
}

// fetch reads one segment (the last one of the image may be shorter).
func (ra *readAhead) fetch(s *segment) {
	defer close(s.done)
	n := min(raSegment, ra.size-s.index*raSegment)
	buf := make([]byte, n)
	k, _ := ra.r.ReadAt(buf, s.index*raSegment)
	if int64(k) == n {
		s.buf, s.ok = buf, true
		return
	}
	// a failed fetch is forgotten: readers read the remote image directly
	ra.mu.Lock()
	ra.segs = slices.DeleteFunc(ra.segs, func(x *segment) bool { return x == s })
	ra.mu.Unlock()
}
