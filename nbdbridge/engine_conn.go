package nbdbridge

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
)

const (
	// readBufferSize is the buffered reader of a connection. Payloads of
	// at least this size are read directly into their pooled buffer.
	readBufferSize = 64 << 10
	// writerMaxBatch and writerMaxBatchBytes bound how many completed
	// replies the writer gathers into one writev.
	writerMaxBatch      = 64
	writerMaxBatchBytes = 4 << 20
)

// engineConn is one connection in the transmission phase.
type engineConn struct {
	e    *Engine
	conn net.Conn
	br   *bufio.Reader
	log  *slog.Logger

	replies chan *job // completed requests, to the writer
	lim     connLimiter
	sampler promhist.Sampler // request reader only: which requests to time
	workers sync.WaitGroup   // dispatched requests whose reply is not queued yet
	dirty   atomic.Bool      // a write succeeded on this connection

	writerDone  chan struct{}
	failOnce    sync.Once
	writeErr    error // set once before writeFailed
	writeFailed atomic.Bool
	iov, iovw   net.Buffers // the writer's scratch

	busy   atomic.Int32 // requests received and not yet answered
	unsent bool         // reader: reads started but not submitted (SendStarted)

	// A request run inline that takes longer than inlineGrace hands the
	// reading on: handoff starts a new reader goroutine, the old one
	// answers its request and ends. The reader that ends the connection
	// reports on readRes.
	ctx     context.Context
	handoff *time.Timer
	readRes chan error
}

// inlineGrace is how long a request may run inline in the reader before
// another goroutine takes over reading the connection, so that a slow
// backend call (a remote read of a copy-on-write device) never holds up
// the requests behind it.
const inlineGrace = time.Millisecond

// errHandedOff ends a reader whose reading role went to another goroutine.
var errHandedOff = errors.New("nbdbridge: reading handed off")

// ServeConn runs the NBD transmission phase on conn — the phase the
// kernel speaks on its socketpair after a netlink CONNECT; no handshake is
// sent or expected — until the client sends NBD_CMD_DISC, the connection
// fails, ctx is cancelled or the engine is closed. It closes conn before
// returning.
//
// Before returning it answers every request it has read and, if the
// connection wrote anything or ended with DISC, flushes a writable
// backend. It returns ErrDisconnected after a DISC; an error wrapping
// io.EOF when the peer closed the connection without DISC; ctx.Err() when
// ctx was cancelled; ErrEngineClosed after Close; otherwise the protocol
// or I/O error that ended the connection (e.g. a bad request magic).
func (e *Engine) ServeConn(ctx context.Context, conn net.Conn) error {
	if !e.enter() {
		conn.Close()
		return ErrEngineClosed
	}
	defer e.leave()
	return e.serveTransmission(ctx, conn, bufio.NewReaderSize(conn, readBufferSize))
}

// serveTransmission is ServeConn after the caller registered with enter;
// br reads conn (the handshake may already have used it).
func (e *Engine) serveTransmission(ctx context.Context, conn net.Conn, br *bufio.Reader) error {
	e.st.connections.Add(1)
	e.st.totalConns.Add(1)
	defer e.st.connections.Add(-1)

	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopEngine := context.AfterFunc(e.ctx, cancel)
	defer stopEngine()

	c := &engineConn{
		e:          e,
		conn:       conn,
		br:         br,
		log:        e.log,
		replies:    make(chan *job, connMaxInFlight),
		writerDone: make(chan struct{}),
		iov:        make(net.Buffers, 0, 2*writerMaxBatch),
	}
	c.lim.init(connMaxInFlight, int64(2*e.maxRequest))
	// On cancellation, stop reading at once and give the replies in
	// flight a little time to be written.
	stopWake := context.AfterFunc(ctx, func() {
		if conn.SetReadDeadline(time.Now()) != nil {
			conn.Close() // no deadlines on this conn: cut it instead
			return
		}
		conn.SetWriteDeadline(time.Now().Add(e.grace))
	})
	defer stopWake()

	c.ctx = ctx
	c.readRes = make(chan error, 1)
	c.handoff = time.AfterFunc(time.Hour, c.takeOverReading)
	c.handoff.Stop()
	go c.writer()
	err := c.readLoop(ctx)
	if errors.Is(err, errHandedOff) {
		err = <-c.readRes
	}
	c.workers.Wait()
	disc := errors.Is(err, ErrDisconnected)
	if !e.readOnly && (disc || c.dirty.Load()) {
		if ferr := e.backend.Flush(); ferr != nil {
			e.log.Warn("nbd: flush at end of connection failed", "err", ferr)
		}
	}
	close(c.replies)
	<-c.writerDone
	conn.Close()

	switch {
	case disc:
		return ErrDisconnected
	case c.writeFailed.Load():
		return c.writeErr
	case e.ctx.Err() != nil:
		return ErrEngineClosed
	case parent.Err() != nil:
		return parent.Err()
	}
	return err
}

// readLoop reads and dispatches requests until DISC or an error.
func (c *engineConn) readLoop(ctx context.Context) error {
	var hdr [wireRequestSize]byte
	for {
		n, err := io.ReadFull(c.br, hdr[:])
		if err != nil {
			return c.readErr(ctx, err, n == 0)
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			c.log.Warn("nbd: closing connection: protocol violation", "remote", remoteName(c.conn), "err", err)
			return err
		}
		if req.Type == wireCmdDisc {
			c.submit()
			return ErrDisconnected
		}
		if err := c.handle(ctx, req); err != nil {
			if !errors.Is(err, errHandedOff) {
				c.submit()
			}
			return err
		}
		if c.unsent && c.br.Buffered() < wireRequestSize {
			c.submit() // no further request waiting: send the burst
		}
	}
}

// takeOverReading continues reading the connection in a new goroutine
// while the previous reader still runs a slow request inline.
func (c *engineConn) takeOverReading() {
	if err := c.readLoop(c.ctx); !errors.Is(err, errHandedOff) {
		c.readRes <- err
	}
}

// submit sends the reads the reader started (AsyncReader).
func (c *engineConn) submit() {
	if c.unsent {
		c.unsent = false
		c.e.async.SendStarted()
	}
}

// readErr explains why reading stopped.
func (c *engineConn) readErr(ctx context.Context, err error, atBoundary bool) error {
	switch {
	case c.writeFailed.Load():
		return c.writeErr
	case ctx.Err() != nil:
		return ctx.Err()
	case atBoundary && errors.Is(err, io.EOF):
		return fmt.Errorf("connection closed without NBD_CMD_DISC: %w", io.EOF)
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return fmt.Errorf("connection closed in the middle of a request: %w", io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("reading request: %w", err)
}

// stopErr is returned when the limiter refuses because the connection is
// going down.
func (c *engineConn) stopErr(ctx context.Context) error {
	if c.writeFailed.Load() {
		return c.writeErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("nbdbridge: connection shut down")
}

// writer writes replies as they complete, several per writev when they
// complete together. After a write error it keeps draining (and
// releasing) replies until the channel is closed.
func (c *engineConn) writer() {
	defer close(c.writerDone)
	batch := make([]*job, 0, writerMaxBatch)
	for j := range c.replies {
		batch = append(batch[:0], j)
		size := j.replyLen()
	fill:
		for len(batch) < writerMaxBatch && size < writerMaxBatchBytes {
			select {
			case j, ok := <-c.replies:
				if !ok {
					break fill
				}
				batch = append(batch, j)
				size += j.replyLen()
			default:
				break fill
			}
		}
		if !c.writeFailed.Load() {
			c.iov = c.iov[:0]
			for _, j := range batch {
				putReply(j.hdr[:], j.errno, j.req.Handle)
				c.iov = append(c.iov, j.hdr[:])
				if j.hasData() {
					c.iov = append(c.iov, *j.buf)
				}
			}
			c.iovw = c.iov // WriteTo consumes its receiver
			if _, err := c.iovw.WriteTo(c.conn); err != nil {
				c.fail(err)
			}
		}
		for _, j := range batch {
			c.finish(j)
		}
		clear(batch)
	}
}

// writeNow writes one reply from the calling goroutine (a request run
// inline or a completed asynchronous read). The runtime serializes writes
// to the connection, so it cannot interleave with the writer's.
func (c *engineConn) writeNow(j *job) {
	if c.writeFailed.Load() {
		return
	}
	putReply(j.hdr[:], j.errno, j.req.Handle)
	j.vec[0] = j.hdr[:]
	n := 1
	if j.hasData() {
		j.vec[1] = *j.buf
		n = 2
	}
	j.iovw = j.vec[:n]
	if _, err := j.iovw.WriteTo(c.conn); err != nil {
		c.fail(err)
	}
}

// fail records the first write error and stops the reader.
func (c *engineConn) fail(err error) {
	c.failOnce.Do(func() {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("replies not taken by the client within %v of shutdown: %w", c.e.grace, err)
		} else {
			err = fmt.Errorf("writing reply: %w", err)
		}
		c.writeErr = err
		c.writeFailed.Store(true)
		c.lim.close()
		c.conn.SetReadDeadline(time.Now())
	})
}

// finish releases what a request held once its reply is written.
func (c *engineConn) finish(j *job) {
	c.e.st.observe(j.req.Type, j.start)
	c.lim.release(j.limBytes)
	c.busy.Add(-1)
	c.e.st.inFlight.Add(-1)
	c.e.putJob(j)
}

// remoteName names the peer for logs.
func remoteName(conn net.Conn) string {
	if a := conn.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "socketpair"
}

// connLimiter bounds the requests (and their buffer bytes) one connection
// has received but not yet answered. A single request larger than the
// byte budget is admitted when nothing else is held.
type connLimiter struct {
	mu       sync.Mutex
	cond     sync.Cond
	n, maxN  int
	used     int64
	maxBytes int64
	closed   bool
}

func (l *connLimiter) init(maxN int, maxBytes int64) {
	l.cond.L = &l.mu
	l.maxN, l.maxBytes = maxN, maxBytes
}

// acquire waits for room for one request of b buffer bytes; false means
// the connection is going down.
func (l *connLimiter) acquire(b int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && (l.n >= l.maxN || (l.used > 0 && l.used+b > l.maxBytes)) {
		l.cond.Wait()
	}
	if l.closed {
		return false
	}
	l.n++
	l.used += b
	return true
}

func (l *connLimiter) release(b int64) {
	l.mu.Lock()
	l.n--
	l.used -= b
	l.mu.Unlock()
	l.cond.Signal()
}

func (l *connLimiter) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.cond.Broadcast()
}
