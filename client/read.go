package client

import (
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

type reqState uint8

const (
	statePending   reqState = iota // in Image.pending, queued or sent
	stateReceiving                 // a receiver is reading its payload
	stateDone                      // finished; done has been signalled
)

// request is one GET_BLOCK of at most Config.MaxRequest bytes. Requests
// are pooled; a request is referenced by Image.pending while pending and
// by its waiter. Queues and connections refer to it by handle only, so a
// recycled request cannot be confused with its former self.
type request struct {
	handle    uint64
	buf       []byte
	off       uint64
	hops      uint8
	state     reqState
	cancelled bool
	conn      *conn     // connection it was last sent on, nil if unsent
	start     time.Time // submission (for Config.Deadline)
	sent      time.Time // last send (for stalls and live RTT)
	err       error
	done      chan struct{} // cap 1, signalled once by finishLocked
	target    ReadTarget    // asynchronous read (StartRead): completed instead of done
	group     *asyncGroup   // the asynchronous read this request is part of, if split
}

// queued is an entry of the wait queue.
type queued struct {
	r      *request
	handle uint64
}

// queueLocked takes a request from the pool for the GET_BLOCK of buf at
// off, enters it in the pending table and the wait queue, and returns it.
// Every field a read sets is set here, so that no value of a recycled
// request's previous read (its hop count) is sent again.
func (i *Image) queueLocked(buf []byte, off uint64, hops uint8, now time.Time) *request {
	r := i.reqs.Get().(*request)
	r.handle = i.nextHandle
	i.nextHandle++
	r.buf, r.off, r.hops = buf, off, hops
	r.state = statePending
	r.start = now
	i.pending[r.handle] = r
	i.waitq = append(i.waitq, queued{r: r, handle: r.handle})
	return r
}

// recycle clears a finished request's references and returns it to the
// pool.
func (i *Image) recycle(r *request) {
	r.buf = nil
	r.err = nil
	r.conn = nil
	r.cancelled = false
	r.target, r.group = nil, nil
	i.reqs.Put(r)
}

// abandonedReq is a request sent on conn whose waiter gave up; its reply
// is drained when it arrives.
type abandonedReq struct {
	conn *conn
	size uint32
}

// ReadAt reads len(p) bytes at offset off. It implements io.ReaderAt:
// a read reaching past Size() is clipped and returns io.EOF with the bytes
// that exist. It blocks until the data arrived, Config.Deadline passed
// (ErrDeadline) or the Image is closed (ErrClosed); server failures are
// handled by failing over, never returned.
func (i *Image) ReadAt(p []byte, off int64) (int, error) {
	return i.ReadAtHops(context.Background(), p, off, 0)
}

// ReadAtContext is ReadAt with a context that can abort the wait.
func (i *Image) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return i.ReadAtHops(ctx, p, off, 0)
}

// ReadAtHops is ReadAtContext that sends hops as the hop-count byte of
// every GET_BLOCK (proxies relaying a client's request send its count + 1,
// possibly with protocol.HopFlagPrefetch or protocol.HopFlagBgRep).
func (i *Image) ReadAtHops(ctx context.Context, p []byte, off int64, hops uint8) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("client: negative offset %d", off)
	}
	if off >= i.size {
		return 0, io.EOF
	}
	var eof error
	n := len(p)
	if int64(n) > i.size-off {
		n = int(i.size - off)
		eof = io.EOF
	}
	if n == 0 {
		return 0, nil
	}
	maxReq := i.cfg.MaxRequest
	count := (n + maxReq - 1) / maxReq
	var small [8]*request
	reqs := small[:0]
	if count > len(small) {
		reqs = make([]*request, 0, count)
	}
	now := time.Now()
	i.mu.Lock()
	if i.closed {
		i.mu.Unlock()
		return 0, ErrClosed
	}
	wasIdle := len(i.pending) == 0
	for k := 0; k < n; k += maxReq {
		end := min(k+maxReq, n)
		reqs = append(reqs, i.queueLocked(p[k:end:end], uint64(off)+uint64(k), hops, now))
	}
	i.dispatchLocked(now)
	i.mu.Unlock()
	if wasIdle {
		i.poke()
	}

	var firstErr error
	good := 0 // bytes of the successful prefix
	prefix := true
	for _, r := range reqs {
		err := i.wait(ctx, r)
		if err != nil && firstErr == nil {
			firstErr = err
		}
		if err != nil {
			prefix = false
		} else if prefix {
			good += len(r.buf)
		}
		i.recycle(r)
	}
	if firstErr != nil {
		return good, firstErr
	}
	return n, eof
}

// wait blocks until r is done or ctx ends; in the latter case it takes r
// back so its buffer is no longer written.
func (i *Image) wait(ctx context.Context, r *request) error {
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
	}
	i.mu.Lock()
	switch r.state {
	case statePending:
		delete(i.pending, r.handle)
		i.abandonLocked(r)
		r.state = stateDone
		i.mu.Unlock()
		return fmt.Errorf("read of %d bytes at %d: %w", len(r.buf), r.off, context.Cause(ctx))
	case stateReceiving:
		r.cancelled = true // the receiver is filling the buffer: let it finish
		i.mu.Unlock()
		<-r.done
		if r.err != nil {
			return fmt.Errorf("read of %d bytes at %d: %w", len(r.buf), r.off, context.Cause(ctx))
		}
		return nil
	}
	i.mu.Unlock()
	<-r.done
	return r.err
}

// abandonLocked remembers that the reply of a sent request must be
// drained. The request must already be out of i.pending.
func (i *Image) abandonLocked(r *request) {
	if c := r.conn; c != nil && !c.dead {
		i.abandoned[r.handle] = abandonedReq{conn: c, size: uint32(len(r.buf))}
	}
}

// finishLocked completes r with err and wakes its waiter (or, for an
// asynchronous read, queues its ReadDone for the next unlock and
// recycles r).
func (i *Image) finishLocked(r *request, err error) {
	delete(i.pending, r.handle)
	if r.state == statePending {
		i.abandonLocked(r)
	}
	r.state = stateDone
	if r.target != nil {
		i.completeLocked(r, err)
		return
	}
	r.err = err
	r.done <- struct{}{}
}

// dispatchLocked sends queued requests on the active connection while it
// has fewer than Config.MaxInflight outstanding.
func (i *Image) dispatchLocked(now time.Time) {
	c := i.active
	if c == nil || c.dead {
		return
	}
	sent := false
	for i.wqHead < len(i.waitq) && c.inflight < i.cfg.MaxInflight {
		q := i.waitq[i.wqHead]
		i.waitq[i.wqHead] = queued{}
		i.wqHead++
		r := q.r
		if r.handle != q.handle || r.state != statePending || r.conn != nil || i.pending[q.handle] != r {
			continue // cancelled, finished or recycled meanwhile
		}
		r.conn = c
		r.sent = now
		c.inflight++
		hops := r.hops
		if c.oldProto {
			hops = 0 // version 2 servers read the full 64-bit offset
		}
		c.sendq = append(c.sendq, protocol.Request{
			Cmd: protocol.CmdGetBlock, Size: uint32(len(r.buf)), Offset: r.off, Hops: hops, Handle: r.handle,
		})
		sent = true
	}
	switch {
	case i.wqHead == len(i.waitq):
		i.waitq = i.waitq[:0]
		i.wqHead = 0
	case i.wqHead > 1024 && i.wqHead > len(i.waitq)/2:
		// Under sustained overload the queue never empties: reclaim the
		// consumed front.
		n := copy(i.waitq, i.waitq[i.wqHead:])
		clear(i.waitq[n:])
		i.waitq = i.waitq[:n]
		i.wqHead = 0
	}
	if sent && !i.holdSend {
		c.signal()
	}
}

// requeueLocked puts unsent-again requests at the front of the wait queue
// (oldest first) and dispatches them if a connection is active.
func (i *Image) requeueLocked(rs []*request, now time.Time) {
	if len(rs) == 0 {
		return
	}
	slices.SortFunc(rs, func(a, b *request) int {
		switch {
		case a.handle < b.handle:
			return -1
		case a.handle > b.handle:
			return 1
		}
		return 0
	})
	rest := i.waitq[i.wqHead:]
	q := make([]queued, 0, len(rs)+len(rest))
	for _, r := range rs {
		r.conn = nil
		q = append(q, queued{r: r, handle: r.handle})
	}
	q = append(q, rest...)
	i.waitq, i.wqHead = q, 0
	i.dispatchLocked(now)
}

// poke wakes the supervisor.
func (i *Image) poke() {
	select {
	case i.wake <- struct{}{}:
	default:
	}
}
