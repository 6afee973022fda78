package nbdbridge

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Defaults and limits of EngineOptions.
const (
	// DefaultMaxRequest is the largest READ or WRITE the engine serves
	// (32 MiB, the kernel's max_hw_sectors); larger ones get EINVAL.
	DefaultMaxRequest = 32 << 20
	// maxWorkers caps the default worker count.
	maxWorkers = 256
	// minWorkers is the smallest default worker count: backends that wait
	// on the network need some parallelism even on one CPU.
	minWorkers = 32
	// connMaxInFlight bounds the requests of one connection that are
	// received but not yet answered (the kernel's queue depth is 128 per
	// connection). Further requests wait in the socket.
	connMaxInFlight = 256
	// shutdownGrace is how long replies may still take to be written after
	// the context was cancelled before the connection is cut.
	shutdownGrace = 5 * time.Second
)

// ErrEngineClosed is returned by ServeConn and ServeListener after Close.
var ErrEngineClosed = errors.New("nbdbridge: engine closed")

// ErrDisconnected is returned by ServeConn when the client ended the
// connection with NBD_CMD_DISC (for the kernel: the device was
// disconnected). Every request received before it was answered and a
// writable backend was flushed.
var ErrDisconnected = errors.New("nbdbridge: client sent NBD_CMD_DISC")

// EngineOptions configure an Engine. The zero value is usable.
type EngineOptions struct {
	// ReadOnly refuses writes (EPERM) and advertises READ_ONLY. It is
	// implied when the backend declares itself read-only (IsReadOnly).
	ReadOnly bool
	// Workers bounds the backend calls running at once, shared by all
	// connections of the export. Default max(32, 4×GOMAXPROCS), at most
	// 256.
	Workers int
	// MaxRequest is the largest READ or WRITE length served (default and
	// recommended 32 MiB). Larger requests get EINVAL; the payload of such
	// a WRITE is read and discarded to keep the stream in sync, unless it
	// exceeds 4×MaxRequest, in which case the connection is closed.
	MaxRequest int
	// MinBlockSize and PreferredBlockSize are announced to socket clients
	// in NBD_INFO_BLOCK_SIZE (defaults 1 and 4096). The engine itself
	// serves any alignment.
	MinBlockSize, PreferredBlockSize uint32
	// Logger receives connection and error logs (default: discarded).
	Logger *slog.Logger
}

// Engine is the NBD transmission engine of one export: it serves a
// Backend on any number of connections, to the kernel (ServeConn on the
// daemon's end of a socketpair) or to NBD clients on a socket
// (ServeListener, ServeNBD).
//
// Per connection one reader goroutine parses requests and hands them to a
// worker pool shared by all connections of the engine; one writer
// goroutine writes the replies as they complete, possibly out of order,
// matched by the request's cookie. A READ's data is complete in a buffer
// before its reply header is written; errors are answered with an errno
// and no payload.
//
// Two shortcuts avoid the goroutine hand-offs where they cost the most:
// a request that arrives while nothing else of its connection is in
// flight, with no further request buffered (a queue-depth-1 stream), runs
// in the reader goroutine, which writes its reply itself; and READs of a
// backend that is an AsyncReader are started by the reader (their
// requests sent to the server in one write per burst) and answered by
// the goroutine that completes them.
type Engine struct {
	backend    Backend
	async      AsyncReader // backend's asynchronous reads, or nil
	local      LocalHinter // backend's hint which requests are local, or nil
	readOnly   bool
	maxRequest int
	minBlock   uint32
	prefBlock  uint32
	log        *slog.Logger
	warnLimit  logLimiter
	grace      time.Duration // shutdownGrace; shorter in tests

	handshakeTimeout time.Duration

	sem    chan struct{} // worker slots
	pool   bufferPool
	jobs   sync.Pool // of *job
	writes *writeTracker
	zeros  func() []byte

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	active int           // connections and listeners being served
	idle   chan struct{} // closed while active == 0

	st statCounters

	// opCost is a moving average of how long backend calls take, per
	// kind of request (opKind); a request runs inline only while its
	// kind is fast.
	opCost [opKinds]atomic.Int64
}

// Kinds of requests for Engine.opCost.
const (
	opRead = iota
	opWrite
	opOther
	opKinds
)

func opKind(t uint16) int {
	switch t {
	case wireCmdRead:
		return opRead
	case wireCmdWrite, wireCmdWriteZeroes, wireCmdTrim:
		return opWrite
	}
	return opOther
}

// noteCost adds the duration of one backend call to its kind's average
// (approximate under concurrency, which is all it needs to be).
func (e *Engine) noteCost(t uint16, d time.Duration) {
	c := &e.opCost[opKind(t)]
	c.Store((7*c.Load() + int64(d)) / 8)
}

// fast reports whether requests of type t usually complete well within
// inlineGrace.
func (e *Engine) fast(t uint16) bool {
	return time.Duration(e.opCost[opKind(t)].Load()) < inlineGrace/2
}

// inlineWorthy reports whether req may run inline in the reader when it is
// alone in flight: its kind is usually fast, or the backend says it needs
// no network round trip (then even a slow local call is cheaper inline, and
// the reader hand-off after inlineGrace keeps later requests moving).
func (e *Engine) inlineWorthy(req protocol.TransmissionRequestHeader) bool {
	if e.fast(req.Type) {
		return true
	}
	if e.local == nil {
		return false
	}
	switch req.Type {
	case wireCmdRead:
		return e.local.Local(false, int64(req.Offset), int64(req.Length))
	case wireCmdWrite:
		return e.local.Local(true, int64(req.Offset), int64(req.Length))
	}
	return false
}

// NewEngine returns an engine serving b.
func NewEngine(b Backend, opts EngineOptions) *Engine {
	if opts.Workers <= 0 {
		opts.Workers = min(max(minWorkers, 4*runtime.GOMAXPROCS(0)), maxWorkers)
	}
	if opts.MaxRequest <= 0 {
		opts.MaxRequest = DefaultMaxRequest
	}
	if opts.MinBlockSize == 0 {
		opts.MinBlockSize = 1
	}
	if opts.PreferredBlockSize == 0 {
		opts.PreferredBlockSize = 4096
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	async, _ := b.(AsyncReader)
	local, _ := b.(LocalHinter)
	e := &Engine{
		backend:    b,
		async:      async,
		local:      local,
		readOnly:   opts.ReadOnly || IsReadOnly(b),
		maxRequest: opts.MaxRequest,
		minBlock:   opts.MinBlockSize,
		prefBlock:  max(opts.PreferredBlockSize, opts.MinBlockSize),
		log:        opts.Logger,
		sem:        make(chan struct{}, opts.Workers),
		writes:     newWriteTracker(),
		zeros:      sync.OnceValue(func() []byte { return make([]byte, zeroChunk) }),
		idle:       make(chan struct{}),
		grace:      shutdownGrace,

		handshakeTimeout: handshakeTimeout,
	}
	close(e.idle)
	e.ctx, e.cancel = context.WithCancel(context.Background())
	return e
}

// Backend returns the backend the engine serves.
func (e *Engine) Backend() Backend { return e.backend }

// Size returns the export size (the backend's current size).
func (e *Engine) Size() int64 { return e.backend.Size() }

// ReadOnly reports whether the export refuses writes.
func (e *Engine) ReadOnly() bool { return e.readOnly }

// Flags returns the NBD transmission flags the export advertises, for the
// handshake and for the kernel's NBD_ATTR_SERVER_FLAGS:
//
//   - writable: HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN.
//     SEND_FLUSH gives the kernel device a volatile write cache, so fsync
//     on /dev/nbdX reaches Backend.Flush; SEND_FUA lets it send FUA writes
//     instead of write+flush pairs; TRIM is advisory (a no-op without a
//     Trimmer); WRITE_ZEROES falls back to writing zeros; CAN_MULTI_CONN
//     holds because all connections share one backend and a FLUSH waits
//     for the writes of every connection.
//   - read-only: HAS_FLAGS|READ_ONLY|CAN_MULTI_CONN. Without SEND_FLUSH the
//     kernel treats the device as write-through and never sends a FLUSH
//     (there is nothing to make durable); TRIM and WRITE_ZEROES would only
//     earn EPERM. The engine still answers a FLUSH (success) or a write
//     (EPERM) from a client that sends one anyway.
//
// ROTATIONAL is never set.
func (e *Engine) Flags() uint16 {
	if e.readOnly {
		return wireFlagHasFlags | wireFlagReadOnly | wireFlagCanMultiConn
	}
	return wireFlagHasFlags | wireFlagSendFlush | wireFlagSendFUA | wireFlagSendTrim |
		wireFlagSendWriteZeroes | wireFlagCanMultiConn
}

// Close stops the engine: every ServeConn and ServeListener stops reading
// new requests, answers the ones in flight, flushes a written backend and
// returns; later calls return ErrEngineClosed. Close does not wait; use
// Wait for that.
func (e *Engine) Close() error {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	e.cancel()
	return nil
}

// Wait blocks until no connection is being served and no listener runs
// (typically after Close or after cancelling their contexts), or until
// ctx is done.
func (e *Engine) Wait(ctx context.Context) error {
	for {
		e.mu.Lock()
		idle := e.idle
		e.mu.Unlock()
		select {
		case <-idle:
			e.mu.Lock()
			done := e.active == 0
			e.mu.Unlock()
			if done {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// enter registers a connection or listener; it fails after Close.
func (e *Engine) enter() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	if e.active == 0 {
		e.idle = make(chan struct{})
	}
	e.active++
	return true
}

// leave ends what enter registered.
func (e *Engine) leave() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.active--
	if e.active == 0 {
		close(e.idle)
	}
}

// logLimiter lets one warning per second through and counts the rest, so
// a failing backend under a queue depth of 128 does not flood the log.
type logLimiter struct {
	last       atomic.Int64 // unix nanoseconds of the last warning
	suppressed atomic.Int64
}

// allow reports whether a warning may be logged now and how many were
// suppressed since the last one.
func (l *logLimiter) allow() (bool, int64) {
	now := time.Now().UnixNano()
	last := l.last.Load()
	if now-last < int64(time.Second) || !l.last.CompareAndSwap(last, now) {
		l.suppressed.Add(1)
		return false, 0
	}
	return true, l.suppressed.Swap(0)
}
