package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Image is an open DNBD3 image: a read-only io.ReaderAt of Size() bytes
// backed by one active connection to one of several servers, with
// background keepalives, RTT probing and failover. All methods are safe
// for concurrent use.
type Image struct {
	cfg  Config
	log  *slog.Logger
	id   identity // name, resolved rid and size: fixed after Open
	size int64

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the Image
	wake   chan struct{}  // wakes the supervisor (cap 1)
	crcMu  sync.Mutex     // one GET_CRC32 at a time
	reqs   sync.Pool      // *request

	mu         sync.Mutex
	closed     bool
	servers    []*server
	active     *conn // nil while panicking
	pending    map[uint64]*request
	waitq      []queued // unsent requests, FIFO from wqHead
	wqHead     int
	abandoned  map[uint64]abandonedReq
	nextHandle uint64
	crcWait    *crcWaiter
	// completions are ReadDone calls of asynchronous reads, run by unlock.
	completions []completion
	// holdSend keeps dispatchLocked from waking the sender: StartRead's
	// caller sends with SendStarted.
	holdSend   bool
	panicSince time.Time
	lastError  error // why the last connection failed
	// pinned is the server SwitchServer chose: RTT probing does not
	// switch away from it (nil: probing chooses).
	pinned *server
	// removed lists servers RemoveServer took out, so that GET_SERVERS
	// does not bring them back (at most maxRemoved).
	removed []netip.AddrPort

	// supervisor state (guarded by mu)
	failoverRunning bool
	failoverAt      time.Time
	failoverBackoff time.Duration
	failedRounds    int // failed failover rounds since the last adoption
	probeRunning    bool
	probeAt         time.Time
	probeInterval   time.Duration
	probeRounds     int // rounds since the last (re)connect
	keepaliveAt     time.Time
	failoverRes     chan failoverResult // cap 1
	probeRes        chan []probeResult  // cap 1

	bytesRead atomic.Uint64
	nreqs     atomic.Uint64
	switches  atomic.Uint64
	failovers atomic.Uint64
	srvErrors atomic.Uint64
}

// Open connects to the configured servers and selects the image. Like the
// reference clients it starts one attempt per server, Config.OpenStagger
// apart, and takes the first server whose SELECT_IMAGE reply is valid; the
// whole wait is bounded by Config.OpenTimeout and ctx. The returned Image
// must be closed.
func Open(ctx context.Context, cfg Config) (*Image, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("image", cfg.Image)
	servers, err := resolveServers(ctx, cfg.Servers, log)
	if err != nil {
		return nil, err
	}
	d, err := openFirst(ctx, cfg, servers)
	if err != nil {
		return nil, err
	}
	i := &Image{
		cfg:         cfg,
		log:         log,
		id:          identity{name: d.reply.Name, rid: d.reply.RID, size: d.reply.Size},
		size:        int64(d.reply.Size),
		wake:        make(chan struct{}, 1),
		servers:     servers,
		pending:     make(map[uint64]*request),
		abandoned:   make(map[uint64]abandonedReq),
		nextHandle:  1,
		failoverRes: make(chan failoverResult, 1),
		probeRes:    make(chan []probeResult, 1),
	}
	i.log = cfg.Logger.With("image", i.id.name, "rid", i.id.rid)
	i.ctx, i.cancel = context.WithCancel(context.Background())
	i.reqs.New = func() any { return &request{done: make(chan struct{}, 1)} }
	i.log.Info("dnbd3: connected", "server", d.srv.key, "size", i.size, "handshake", d.hsRTT)
	i.mu.Lock()
	i.adoptLocked(d, "initial connection")
	i.mu.Unlock()
	i.wg.Add(1)
	go i.supervise()
	return i, nil
}

// openFirst runs the staggered initial connection attempts.
func openFirst(ctx context.Context, cfg Config, servers []*server) (*dialed, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.OpenTimeout)
	defer cancel()
	delays := make([]time.Duration, len(servers))
	for k := range delays {
		delays[k] = time.Duration(k) * cfg.OpenStagger
	}
	win, failed := raceHandshakes(ctx, cfg.Dial, servers, delays, identity{name: cfg.Image, rid: cfg.RID}, cfg.SelectFlags, cfg.ConnectTimeout, nil)
	now := time.Now()
	var errs []string
	notFound, tried := 0, 0
	for _, e := range failed {
		e.srv.fail(e.err, now)
		if e.err == errNotTried {
			continue
		}
		tried++
		if errors.Is(e.err, errClosedInHandshake) {
			notFound++
		}
		errs = append(errs, e.srv.key+": "+e.err.Error())
	}
	if win != nil {
		return win, nil
	}
	ridStr := "latest"
	if cfg.RID != 0 {
		ridStr = fmt.Sprint(cfg.RID)
	}
	if notFound > 0 && notFound == tried {
		return nil, fmt.Errorf("image %q rid %s not found on any of %s (each server closed the connection after SELECT_IMAGE; check the name and revision): %w",
			cfg.Image, ridStr, serverKeys(servers), ErrImageNotFound)
	}
	return nil, fmt.Errorf("cannot open image %q rid %s: no server answered (%s); check the addresses and that dnbd3-server runs there: %w",
		cfg.Image, ridStr, strings.Join(errs, "; "), ErrNoServer)
}

// Size returns the image's virtual size in bytes (a multiple of 4096).
func (i *Image) Size() int64 { return i.size }

// Name returns the image name as the first server reported it.
func (i *Image) Name() string { return i.id.name }

// RID returns the image's revision (resolved if Config.RID was 0).
func (i *Image) RID() uint16 { return i.id.rid }

// Close stops all goroutines and closes every connection. Reads still
// pending fail with ErrClosed. Close is idempotent.
func (i *Image) Close() error {
	i.mu.Lock()
	if i.closed {
		i.mu.Unlock()
		return nil
	}
	i.closed = true
	if c := i.active; c != nil {
		i.active = nil
		c.kill()
	}
	for _, r := range i.pending {
		if r.state == statePending {
			i.finishLocked(r, ErrClosed)
		}
	}
	if w := i.crcWait; w != nil {
		i.crcWait = nil
		w.ch <- crcResult{err: ErrClosed}
	}
	i.unlock()
	i.cancel()
	i.wg.Wait()
	// Results of probes or failovers that finished after the supervisor
	// left still hold connections.
	select {
	case r := <-i.failoverRes:
		r.d.close()
	default:
	}
	select {
	case rs := <-i.probeRes:
		for _, r := range rs {
			r.d.close()
		}
	default:
	}
	i.log.Debug("dnbd3: image closed")
	return nil
}
