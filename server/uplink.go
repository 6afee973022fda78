package server

// An uplink is a proxy's connection to the servers it fetches an
// incomplete image from. It is a client.Image (the project's DNBD3 client
// library: failover, RTT probing and switching, keepalive, re-sending of
// pending requests) plus the queue of fetches in flight (relay.go) and the
// background replication (replicate.go).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
)

// Uplink queue limits.
const (
	// uplinkQueueMax is the most fetches an uplink has in flight; a client
	// request that would need more gets its connection closed.
	uplinkQueueMax = 500
	// uplinkCongested is the queue length from which the uplink counts as
	// congested (RPC problems 16, handshake penalty).
	uplinkCongested = 400
	// maxFetchWaiters is the most client requests attached to one fetch.
	maxFetchWaiters = 32
)

// errUplinkGone is the error of fetches whose uplink was closed.
var errUplinkGone = errors.New("server: uplink closed")

// uplink fetches blocks of one incomplete image.
type uplink struct {
	p   *proxy
	img *image
	log *slog.Logger

	ctx    context.Context // ends when the uplink closes
	cancel context.CancelFunc
	ready  chan struct{} // closed when connecting finished
	ci     *client.Image // set before ready is closed; nil if connecting failed
	err    error         // why connecting failed

	mu           sync.Mutex
	fetches      []*fetch // in flight, oldest first
	clientWait   int      // fetches with client requests waiting
	lastClient   time.Time
	closing      bool
	bgrCompleted int            // background replication fetches completed (slow start)
	wg           sync.WaitGroup // fetch and replication goroutines

	bgrWake chan struct{} // cap 1
	budget  byteBudget    // bytes of fetch buffers allocated
	// reuse is set while hash blocks are copied from the previous
	// revision (reuse.go); background replication leaves them alone.
	reuse atomic.Pointer[reusePlan]

	current syncValue[netip.AddrPort] // the server currently connected, for the cycle rule
	seen    map[string]serverSeen     // monitor state per server
}

// serverSeen is what the monitor last saw of an uplink server.
type serverSeen struct {
	rtt     time.Duration
	samples int
}

// syncValue is a value guarded by a mutex (zero value usable).
type syncValue[T any] struct {
	mu sync.Mutex
	v  T
}

func (a *syncValue[T]) load() T {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.v
}

func (a *syncValue[T]) store(v T) {
	a.mu.Lock()
	a.v = v
	a.mu.Unlock()
}

// ensureUplink returns img's uplink, starting one (connecting in the
// background) if there is none. It fails on non-proxies, right after a
// failed start (uplinkRetryDelay) and when no alt-server may serve the
// image.
func (p *proxy) ensureUplink(img *image) (*uplink, error) {
	if up := img.up.Load(); up != nil && !up.isClosing() {
		return up, nil
	}
	cfg := p.cfg()
	if !cfg.IsProxy {
		return nil, errNoUplink
	}
	img.upMu.Lock()
	defer img.upMu.Unlock()
	if up := img.up.Load(); up != nil && !up.isClosing() {
		return up, nil
	}
	if t := img.upFailed.Load(); t != 0 && time.Since(time.Unix(0, t)) < uplinkRetryDelay {
		return nil, fmt.Errorf("%w: the last attempt failed moments ago", errNoUplink)
	}
	servers := p.candidateAddrs(img.Name)
	if len(servers) == 0 {
		return nil, errNoUplink
	}
	up := p.newUplink(img)
	if up == nil {
		return nil, errUplinkGone
	}
	if !up.spawn(func() { up.connect(servers) }) {
		up.setConn(nil, errUplinkGone)
	}
	return up, nil
}

// attachUplink makes ci (connected by a lookup) the uplink of img, unless
// img has one already.
func (p *proxy) attachUplink(img *image, ci *client.Image) {
	img.upMu.Lock()
	defer img.upMu.Unlock()
	if up := img.up.Load(); up != nil && !up.isClosing() {
		ci.Close()
		return
	}
	up := p.newUplink(img)
	if up == nil {
		ci.Close()
		return
	}
	up.setConn(ci, nil)
}

// newUplink registers a new uplink for img (caller holds img.upMu).
func (p *proxy) newUplink(img *image) *uplink {
	if !img.ref() {
		return nil
	}
	up := &uplink{
		p:       p,
		img:     img,
		log:     p.log.With("image", img.String()),
		ready:   make(chan struct{}),
		bgrWake: make(chan struct{}, 1),
		seen:    map[string]serverSeen{},
	}
	up.ctx, up.cancel = context.WithCancel(p.ctx)
	up.budget.init(up.ctx, max(fetchBufferBudget, 2*p.cfg().MaxPayload))
	up.lastClient = time.Now()
	if !p.register(up) {
		up.cancel()
		img.unref()
		return nil
	}
	img.up.Store(up)
	p.kick()
	return up
}

// connect opens the client connection to the candidate servers.
func (up *uplink) connect(servers []string) {
	img := up.img
	ci, err := client.Open(up.ctx, up.p.clientConfig(img.Name, img.RID, servers))
	if err == nil && (ci.Name() != img.Name || ci.RID() != img.RID || ci.Size() != img.VirtualSize) {
		err = fmt.Errorf("server: uplink %s serves %s rid %d with %d bytes, the local copy has %d",
			ci.Stats().Current, ci.Name(), ci.RID(), ci.Size(), img.VirtualSize)
		ci.Close()
	}
	if err != nil {
		img.upFailed.Store(time.Now().UnixNano())
		up.log.Warn("cannot start uplink", "err", err)
		up.setConn(nil, err)
		up.p.goTracked(up.close)
		return
	}
	up.setConn(ci, nil)
}

// setConn publishes the result of connecting and starts replication.
func (up *uplink) setConn(ci *client.Image, err error) {
	up.ci, up.err = ci, err
	if ci != nil {
		cur := ci.Stats().Current
		up.setCurrent(cur)
		up.img.upFailed.Store(0)
		up.log.Info("uplink connected", "server", cur)
		up.startReuse()
		up.spawn(up.replicate)
	}
	close(up.ready)
}

// spawn runs f in a goroutine that close waits for; false if closing.
func (up *uplink) spawn(f func()) bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	if up.closing {
		return false
	}
	up.wg.Add(1)
	go func() {
		defer up.wg.Done()
		f()
	}()
	return true
}

// connected reports whether the uplink has a live connection.
func (up *uplink) connected() bool {
	select {
	case <-up.ready:
	default:
		return false
	}
	if up.ci == nil || up.isClosing() {
		return false
	}
	return up.setCurrent(up.ci.Stats().Current)
}

// setCurrent records the client library's current server address (none
// while it is not connected) and reports whether there is one.
func (up *uplink) setCurrent(addr string) bool {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		up.current.store(netip.AddrPort{})
		return false
	}
	up.current.store(ap)
	return true
}

func (up *uplink) isClosing() bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	return up.closing
}

// congested reports whether the fetch queue is nearly full.
func (up *uplink) congested() bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	return len(up.fetches) >= uplinkCongested
}

// server returns the address of the current uplink server, "" if none.
func (up *uplink) server() string {
	if ap := up.current.load(); ap.IsValid() {
		return formatHost(ap)
	}
	return ""
}

// close stops the uplink: pending fetches fail (their clients get
// CMD_ERROR), the connection closes, and the image reference is dropped.
func (up *uplink) close() {
	up.mu.Lock()
	if up.closing {
		up.mu.Unlock()
		return
	}
	up.closing = true
	up.mu.Unlock()
	up.cancel()
	<-up.ready
	if up.ci != nil {
		up.ci.Close()
	}
	up.wg.Wait()
	up.img.up.CompareAndSwap(up, nil)
	up.p.unregister(up)
	up.img.unref()
}

// idle reports whether the housekeeping should close the uplink: the
// image is complete (or gone) and nothing is in flight, or no client used
// it for the idle timeout and full background replication does not need
// it.
func (up *uplink) idle(now time.Time, cfg *Config) bool {
	up.mu.Lock()
	busy := len(up.fetches) > 0
	last := up.lastClient
	closing := up.closing
	up.mu.Unlock()
	if closing {
		return false
	}
	select {
	case <-up.ready:
	default:
		return false // still connecting
	}
	if !cfg.IsProxy {
		return true // reconfigured (SIGHUP): no more uplinks
	}
	if busy {
		return false
	}
	if !up.img.incomplete() || up.p.s.store.loaded(up.img.Name, up.img.RID) != up.img {
		return true
	}
	if now.Sub(last) < up.p.idleTimeout() {
		return false
	}
	return !(cfg.BackgroundReplication == bgrFull && up.img.Users() >= cfg.BGRMinClients)
}

func (up *uplink) idleReason(cfg *Config) string {
	switch {
	case !cfg.IsProxy:
		return "isProxy=false"
	case !up.img.incomplete():
		return "image complete"
	case up.p.s.store.loaded(up.img.Name, up.img.RID) != up.img:
		return "image unloaded"
	}
	return "no client traffic"
}

// monitor copies the client library's view of the uplink servers into
// the alt-server entries (RTT history and failure counts for RPC
// altservers) and remembers the current server.
func (up *uplink) monitor() {
	select {
	case <-up.ready:
	default:
		return
	}
	if up.ci == nil {
		return
	}
	st := up.ci.Stats()
	up.setCurrent(st.Current)
	for _, ss := range st.Servers {
		a := up.p.altByAddr(ss.Addr)
		if a == nil {
			continue
		}
		prev := up.seen[ss.Addr]
		if ss.Samples > 0 && (ss.RTT != prev.rtt || ss.Samples != prev.samples) {
			a.recordRTT(uint32(max(ss.RTT.Microseconds(), 1)))
			if ss.Consec == 0 {
				a.recordSuccess()
			}
		} else if ss.Active && ss.Consec == 0 && a.snapshot().Fails > 0 {
			a.recordSuccess()
		}
		up.seen[ss.Addr] = serverSeen{rtt: ss.RTT, samples: ss.Samples}
	}
}

// fetchBufferBudget bounds the memory of fetch buffers per uplink (at
// least two of maxPayload): fetches beyond it wait before they allocate.
const fetchBufferBudget = 64 << 20

// byteBudget is a counting semaphore of bytes.
type byteBudget struct {
	mu    sync.Mutex
	cond  *sync.Cond
	ctx   context.Context
	used  int64
	limit int64
}

func (b *byteBudget) init(ctx context.Context, limit int64) {
	b.cond = sync.NewCond(&b.mu)
	b.ctx = ctx
	b.limit = limit
	context.AfterFunc(ctx, func() {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	})
}

// acquire waits until n bytes fit (a single request always fits when
// nothing else is in use). It reports false if the context ended.
func (b *byteBudget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.used > 0 && b.used+n > b.limit {
		if b.ctx.Err() != nil {
			return false
		}
		b.cond.Wait()
	}
	if b.ctx.Err() != nil {
		return false
	}
	b.used += n
	return true
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.cond.Broadcast()
	b.mu.Unlock()
}
