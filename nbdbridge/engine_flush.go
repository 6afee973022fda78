package nbdbridge

import "sync"

// writeTracker implements the FLUSH ordering rule of the engine.
//
// Every write-type request (WRITE, TRIM, WRITE_ZEROES) takes a ticket from
// a counter shared by all connections of the export when the reader
// receives it, and hands it back when the backend call returned (before
// the reply is queued). A FLUSH notes the counter when it is received and,
// before calling Backend.Flush, waits until every ticket below that mark is
// back. So a FLUSH covers every write that was received — on any connection
// — before the FLUSH was received, which includes every write that was
// replied to before it (the guarantee proto.md asks for, also across
// connections as CAN_MULTI_CONN requires). Writes received after the FLUSH
// are neither waited for nor blocked: they run concurrently with it.
type writeTracker struct {
	mu       sync.Mutex
	cond     sync.Cond
	next     uint64              // next ticket
	inflight map[uint64]struct{} // tickets not yet back
	waiters  int                 // flushes in wait
}

func newWriteTracker() *writeTracker {
	t := &writeTracker{inflight: make(map[uint64]struct{})}
	t.cond.L = &t.mu
	return t
}

// begin takes a ticket for a write-type request.
func (t *writeTracker) begin() uint64 {
	t.mu.Lock()
	n := t.next
	t.next++
	t.inflight[n] = struct{}{}
	t.mu.Unlock()
	return n
}

// end hands a ticket back.
func (t *writeTracker) end(ticket uint64) {
	t.mu.Lock()
	delete(t.inflight, ticket)
	if t.waiters > 0 {
		t.cond.Broadcast()
	}
	t.mu.Unlock()
}

// mark returns the barrier for a FLUSH received now.
func (t *writeTracker) mark() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.next
}

// wait blocks until every ticket below mark is back. It cannot be
// cancelled: the writes it waits for are running backend calls, which the
// Backend contract bounds with the backend's own deadline.
func (t *writeTracker) wait(mark uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.waiters++
	for t.pendingBelow(mark) {
		t.cond.Wait()
	}
	t.waiters--
}

func (t *writeTracker) pendingBelow(mark uint64) bool {
	for n := range t.inflight {
		if n < mark {
			return true
		}
	}
	return false
}
