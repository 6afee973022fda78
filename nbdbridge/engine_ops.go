package nbdbridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// zeroChunk is the size of the zero buffer WRITE_ZEROES writes from when
// the backend is no ZeroWriter.
const zeroChunk = 1 << 20

// job is one request on its way from the reader through a worker to the
// writer.
type job struct {
	req      protocol.TransmissionRequestHeader
	buf      *[]byte // WRITE payload or READ data (pooled)
	errno    uint32
	ticket   uint64 // writeTracker ticket of a write-type request
	ticketed bool
	mark     uint64 // writeTracker mark of a FLUSH
	limBytes int64  // bytes held in the connection's limiter
	hdr      [wireReplySize]byte
	c        *engineConn   // an asynchronous read's connection (ReadDone)
	vec      [2][]byte     // writeNow's header and payload
	iovw     net.Buffers   // writeNow's writev (consumed by WriteTo)
	start    time.Duration // promhist.Now when the request was read, 0: not timed
}

// hasData reports whether the reply carries the READ data.
func (j *job) hasData() bool {
	return j.errno == 0 && j.req.Type == wireCmdRead && j.buf != nil
}

// replyLen is the number of bytes the reply takes on the wire.
func (j *job) replyLen() int {
	if j.hasData() {
		return wireReplySize + len(*j.buf)
	}
	return wireReplySize
}

func (e *Engine) getJob() *job {
	if v := e.jobs.Get(); v != nil {
		return v.(*job)
	}
	return new(job)
}

func (e *Engine) putJob(j *job) {
	e.pool.put(j.buf)
	*j = job{}
	e.jobs.Put(j)
}

// handle validates one request, reads its payload and dispatches it to a
// worker, or queues an error reply at once. A non-nil error ends the
// connection.
func (c *engineConn) handle(ctx context.Context, req protocol.TransmissionRequestHeader) error {
	e := c.e
	errno, err := e.check(req)
	if err != nil {
		c.log.Warn("nbd: closing connection: protocol violation", "remote", remoteName(c.conn), "err", err)
		return err
	}
	var bufBytes int64
	if errno == 0 && (req.Type == wireCmdRead || req.Type == wireCmdWrite) {
		bufBytes = int64(req.Length)
	}
	if !c.lim.acquire(bufBytes) {
		return c.stopErr(ctx)
	}
	e.st.inFlight.Add(1)
	c.busy.Add(1)
	j := e.getJob()
	j.req = req
	j.limBytes = bufBytes
	if c.sampler.Next() {
		j.start = promhist.Now()
	}

	if req.Type == wireCmdWrite && req.Length > 0 {
		if rerr := c.readPayload(j, errno); rerr != nil {
			c.finish(j)
			return c.readErr(ctx, rerr, false)
		}
	}
	if errno != 0 {
		e.st.errors.Add(1)
		c.log.Debug("nbd: invalid request", "cmd", commandName(req.Type), "flags", req.CommandFlags,
			"offset", req.Offset, "length", req.Length, "errno", errno)
		j.errno = errno
		c.replies <- j
		return nil
	}

	if e.async != nil && req.Type == wireCmdRead && req.Length > 0 {
		j.c = c
		j.buf = e.pool.get(int(req.Length))
		c.workers.Add(1)
		c.unsent = true
		e.async.StartRead(*j.buf, int64(req.Offset), j)
		return nil
	}
	return c.dispatch(ctx, j)
}

// readPayload reads a WRITE's payload into a pooled buffer, or discards
// it for a request that is answered with errno.
func (c *engineConn) readPayload(j *job, errno uint32) error {
	if errno != 0 {
		_, err := io.CopyN(io.Discard, c.br, int64(j.req.Length))
		return err
	}
	j.buf = c.e.pool.get(int(j.req.Length))
	_, err := io.ReadFull(c.br, *j.buf)
	return err
}

// dispatch runs a valid request: here, when nothing else of this
// connection is in flight and no further request is buffered (no hand-off
// to a worker and of its reply to the writer), else on a worker.
func (c *engineConn) dispatch(ctx context.Context, j *job) error {
	e, req := c.e, j.req
	inline := c.busy.Load() == 1 && c.br.Buffered() < wireRequestSize && e.inlineWorthy(req)
	if inline {
		select {
		case e.sem <- struct{}{}:
		default:
			inline = false
		}
	}
	if !inline {
		select {
		case e.sem <- struct{}{}:
		case <-ctx.Done():
			j.errno = wireESHUTDOWN
			e.st.errors.Add(1)
			c.replies <- j
			return ctx.Err()
		}
	}
	switch req.Type {
	case wireCmdWrite, wireCmdTrim, wireCmdWriteZeroes:
		// Taken while holding a worker slot, so a FLUSH (which also holds
		// one) only ever waits for writes that can run.
		j.ticket, j.ticketed = e.writes.begin(), true
	case wireCmdFlush:
		j.mark = e.writes.mark()
	}
	if inline {
		c.workers.Add(1)
		c.handoff.Reset(inlineGrace)
		e.execute(c, j)
		handedOff := !c.handoff.Stop() // too slow: another goroutine reads on
		if j.ticketed {
			e.writes.end(j.ticket)
		}
		<-e.sem
		c.writeNow(j)
		c.finish(j)
		c.workers.Done()
		if handedOff {
			return errHandedOff
		}
		return nil
	}
	c.workers.Add(1)
	go c.run(j)
	return nil
}

// ReadDone completes a READ started on an AsyncReader: the reply goes out
// from the completing goroutine.
func (j *job) ReadDone(err error) {
	c := j.c
	c.e.readResult(j, len(*j.buf), err)
	c.writeNow(j)
	c.finish(j)
	c.workers.Done()
}

// check validates a request against the export. It returns the errno to
// answer with (0: valid), or an error if the connection must be closed.
func (e *Engine) check(req protocol.TransmissionRequestHeader) (uint32, error) {
	size := uint64(max(e.backend.Size(), 0))
	end, carry := bits.Add64(req.Offset, uint64(req.Length), 0)
	inRange := carry == 0 && end <= size
	switch req.Type {
	case wireCmdRead:
		switch {
		case req.CommandFlags&^wireCmdFlagFUA != 0, int64(req.Length) > int64(e.maxRequest), !inRange:
			return wireEINVAL, nil
		}
	case wireCmdWrite:
		switch {
		case int64(req.Length) > 4*int64(e.maxRequest):
			return 0, fmt.Errorf("nbdbridge: WRITE of %d bytes exceeds the limit of %d by far", req.Length, e.maxRequest)
		case req.CommandFlags&^wireCmdFlagFUA != 0, int64(req.Length) > int64(e.maxRequest):
			return wireEINVAL, nil
		case e.readOnly:
			return wireEPERM, nil
		case !inRange:
			return wireENOSPC, nil
		}
	case wireCmdFlush:
		if req.CommandFlags&^wireCmdFlagFUA != 0 {
			return wireEINVAL, nil
		}
	case wireCmdTrim, wireCmdWriteZeroes:
		allowed := wireCmdFlagFUA
		if req.Type == wireCmdWriteZeroes {
			allowed |= wireCmdFlagNoHole
		}
		switch {
		case req.CommandFlags&^allowed != 0:
			return wireEINVAL, nil
		case e.readOnly:
			return wireEPERM, nil
		case !inRange:
			return wireENOSPC, nil
		}
	default:
		return wireEINVAL, nil
	}
	return 0, nil
}

// run executes a request on a worker slot and queues its reply.
func (c *engineConn) run(j *job) {
	e := c.e
	e.execute(c, j)
	if j.ticketed {
		e.writes.end(j.ticket)
	}
	<-e.sem
	c.replies <- j
	c.workers.Done()
}

// execute calls the backend for one valid request and sets j.errno.
func (e *Engine) execute(c *engineConn, j *job) {
	start := time.Now()
	defer func() { e.noteCost(j.req.Type, time.Since(start)) }()
	var err error
	switch j.req.Type {
	case wireCmdRead:
		if j.req.Length > 0 {
			j.buf = e.pool.get(int(j.req.Length))
			n, rerr := e.backend.ReadAt(*j.buf, int64(j.req.Offset))
			e.readResult(j, n, rerr)
			return
		}
		e.st.reads.Add(1)
	case wireCmdWrite:
		err = e.execWrite(c, j)
	case wireCmdFlush:
		if !e.readOnly {
			e.writes.wait(j.mark)
			err = e.backend.Flush()
		}
		if err == nil {
			e.st.flushes.Add(1)
		}
	case wireCmdTrim:
		err = e.execTrim(c, &j.req)
	case wireCmdWriteZeroes:
		err = e.execWriteZeroes(c, &j.req)
	}
	if err != nil {
		e.failed(j, err)
	}
}

// fua reports whether r asks for its data to be durable on reply.
func fua(r *protocol.TransmissionRequestHeader) bool { return r.CommandFlags&wireCmdFlagFUA != 0 }

// execWrite writes j's payload (durably with FUA) and frees it.
func (e *Engine) execWrite(c *engineConn, j *job) error {
	var p []byte
	if j.buf != nil {
		p = *j.buf
	}
	off := int64(j.req.Offset)
	var n int
	var err error
	if fw, ok := e.backend.(FUAWriter); ok && fua(&j.req) {
		n, err = fw.WriteAtFUA(p, off)
	} else {
		n, err = e.backend.WriteAt(p, off)
		if err == nil && fua(&j.req) {
			err = e.backend.Flush()
		}
	}
	if err == nil && n < len(p) {
		err = fmt.Errorf("short write: %d of %d bytes: %w", n, len(p), io.ErrShortWrite)
	}
	e.pool.put(j.buf)
	j.buf = nil
	if err == nil {
		c.dirty.Store(true)
		e.st.writes.Add(1)
		e.st.bytesWritten.Add(uint64(j.req.Length))
	}
	return err
}

// execTrim passes a TRIM to a Trimmer. TRIM is advisory: without one it
// is a successful no-op, and FUA has nothing to make durable then.
func (e *Engine) execTrim(c *engineConn, r *protocol.TransmissionRequestHeader) error {
	var err error
	if t, ok := e.backend.(Trimmer); ok && r.Length > 0 {
		err = t.Trim(int64(r.Offset), int64(r.Length))
		if err == nil && fua(r) {
			err = e.backend.Flush()
		}
	}
	if err == nil {
		c.dirty.Store(true)
		e.st.trims.Add(1)
	}
	return err
}

// execWriteZeroes zeroes a range, through a ZeroWriter if the backend is
// one.
func (e *Engine) execWriteZeroes(c *engineConn, r *protocol.TransmissionRequestHeader) error {
	var err error
	if r.Length > 0 {
		off, length := int64(r.Offset), int64(r.Length)
		if z, ok := e.backend.(ZeroWriter); ok {
			err = z.WriteZeroes(off, length, r.CommandFlags&wireCmdFlagNoHole != 0)
		} else {
			err = e.writeZeros(off, length)
		}
		if err == nil && fua(r) {
			err = e.backend.Flush()
		}
	}
	if err == nil {
		c.dirty.Store(true)
		e.st.writeZeroes.Add(1)
	}
	return err
}

// readResult records the outcome of a READ that filled n bytes of j.buf.
func (e *Engine) readResult(j *job, n int, err error) {
	switch {
	case err != nil && n == len(*j.buf) && errors.Is(err, io.EOF):
		err = nil // io.ReaderAt may report EOF with a full read at the end
	case err == nil && n < len(*j.buf):
		err = fmt.Errorf("short read: %d of %d bytes: %w", n, len(*j.buf), io.ErrUnexpectedEOF)
	}
	if err != nil {
		e.failed(j, err)
		return
	}
	e.st.reads.Add(1)
	e.st.bytesRead.Add(uint64(len(*j.buf)))
}

// failed turns a backend error into j's error reply.
func (e *Engine) failed(j *job, err error) {
	r := &j.req
	e.pool.put(j.buf)
	j.buf = nil
	j.errno = errnoFor(err)
	e.st.errors.Add(1)
	e.st.backendErrors.Add(1)
	if ok, suppressed := e.warnLimit.allow(); ok {
		e.log.Warn("nbd: backend error", "cmd", commandName(r.Type), "offset", r.Offset, "length", r.Length,
			"errno", j.errno, "err", err, "suppressed", suppressed)
	}
}

// writeZeros writes length zero bytes at off in chunks.
func (e *Engine) writeZeros(off, length int64) error {
	zeros := e.zeros()
	for length > 0 {
		n := min(length, int64(len(zeros)))
		w, err := e.backend.WriteAt(zeros[:n], off)
		if err != nil {
			return err
		}
		if int64(w) < n {
			return fmt.Errorf("short write: %d of %d bytes: %w", w, n, io.ErrShortWrite)
		}
		off += n
		length -= n
	}
	return nil
}
