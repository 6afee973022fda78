package client

import (
	"fmt"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Asynchronous reads: StartRead queues the GET_BLOCKs of a read and
// returns at once; the receiver goroutine reads the reply's payload
// straight into the caller's buffer and calls ReadDone. No goroutine waits
// for the read and none is woken to send it: SendStarted writes the queued
// requests from the caller's goroutine, so that a caller that starts
// several reads sends them with one write. This is the path of the kernel
// NBD bridge, where every goroutine hand-off per request costs a thread
// wake-up.

// ReadTarget receives the completion of an asynchronous read.
type ReadTarget interface {
	// ReadDone is called exactly once per StartRead: with nil once the
	// buffer holds the data, or with the error that ended the read
	// (ErrDeadline, ErrClosed). It is called without any lock of the
	// Image held, usually from the connection's receiver goroutine, so it
	// must not block for long.
	ReadDone(err error)
}

// asyncGroup completes a read that was split into several requests.
// Guarded by Image.mu.
type asyncGroup struct {
	left   int
	err    error
	target ReadTarget
}

// completion is a ReadDone call that is due once Image.mu is released.
type completion struct {
	target ReadTarget
	err    error
}

// StartRead starts reading len(p) bytes at off into p; t.ReadDone reports
// the outcome. The range must lie within Size(). The requests are queued
// but only sent by the next SendStarted (or by the connection's sender
// when other traffic wakes it), so call SendStarted after the last
// StartRead of a batch. Like ReadAt, the read fails only after
// Config.Deadline or when the Image is closed; server failures are handled
// by failing over.
func (i *Image) StartRead(p []byte, off int64, t ReadTarget) {
	n := len(p)
	if off < 0 || off+int64(n) > i.size || n == 0 {
		var err error
		if n > 0 {
			err = fmt.Errorf("client: read of %d bytes at %d outside the image (%d bytes)", n, off, i.size)
		}
		t.ReadDone(err)
		return
	}
	now := time.Now()
	i.mu.Lock()
	if i.closed {
		i.mu.Unlock()
		t.ReadDone(ErrClosed)
		return
	}
	wasIdle := len(i.pending) == 0
	maxReq := i.cfg.MaxRequest
	var g *asyncGroup
	if n > maxReq {
		g = &asyncGroup{left: (n + maxReq - 1) / maxReq, target: t}
	}
	for k := 0; k < n; k += maxReq {
		end := min(k+maxReq, n)
		r := i.queueLocked(p[k:end:end], uint64(off)+uint64(k), 0, now)
		r.target, r.group = t, g
	}
	i.holdSend = true
	i.dispatchLocked(now)
	i.holdSend = false
	i.mu.Unlock()
	if wasIdle {
		i.poke()
	}
}

// sendScratch holds the encoded request headers of one SendStarted.
var sendScratch = sync.Pool{New: func() any { b := make([]byte, 0, 64*protocol.RequestSize); return &b }}

// SendStarted writes the requests that StartRead queued on the active
// connection, from the calling goroutine. It returns once they are
// written (or the connection failed, which fails over as usual).
func (i *Image) SendStarted() {
	i.mu.Lock()
	c := i.active
	if c == nil || c.dead || len(c.sendq) == 0 {
		i.mu.Unlock()
		return
	}
	bp := sendScratch.Get().(*[]byte)
	buf := (*bp)[:0]
	for k := range c.sendq {
		buf = append(buf, make([]byte, protocol.RequestSize)...)
		c.sendq[k].MarshalTo(buf[len(buf)-protocol.RequestSize:])
	}
	clear(c.sendq)
	c.sendq = c.sendq[:0]
	i.mu.Unlock()
	// Writes to one connection are serialized by the runtime, so this
	// cannot interleave with the sender goroutine's.
	if _, err := c.nc.Write(buf); err != nil {
		i.failConn(c, fmt.Errorf("send to %s: %w", c.srv.key, err))
	}
	*bp = buf
	sendScratch.Put(bp)
}

// completeLocked records the outcome of an asynchronous request; its
// ReadDone runs at the next unlock. r is recycled.
func (i *Image) completeLocked(r *request, err error) {
	t := r.target
	if g := r.group; g != nil {
		if err != nil && g.err == nil {
			g.err = err
		}
		g.left--
		if g.left > 0 {
			t = nil
		} else {
			err = g.err
		}
	}
	if t != nil {
		i.completions = append(i.completions, completion{t, err})
	}
	i.recycle(r)
}

// unlock releases i.mu and then runs the ReadDone calls of asynchronous
// reads that finished while it was held.
func (i *Image) unlock() {
	if len(i.completions) == 0 {
		i.mu.Unlock()
		return
	}
	var small [8]completion
	run := small[:0]
	if len(i.completions) > len(small) {
		run = make([]completion, 0, len(i.completions))
	}
	run = append(run, i.completions...)
	clear(i.completions)
	i.completions = i.completions[:0]
	i.mu.Unlock()
	for _, c := range run {
		c.target.ReadDone(c.err)
	}
}
