package server

// Proxy mode: the server fetches images it does not have from uplink
// servers (the alt-servers that are not client-only), caches what it
// fetched in a local copy with a `.map` of the present 4 KiB blocks, and
// optionally replicates the rest in the background. This file holds the
// per-server manager: housekeeping (map saves, uplink idle timeouts, RTT
// history), the handshake rules for incomplete images, and shutdown.
//
// How the parts fit:
//
//	clone.go      lookup of unknown images upstream, creation of the local copy
//	uplink.go     one uplink per incomplete image: a client.Image to the uplink servers
//	relay.go      client reads of absent blocks: dedup, prefetch, replies out of order
//	replicate.go  background replication
//	reuse.go      copying unchanged hash blocks from the previous revision
//	lru.go        disk space check and deletion of old replicated images
//	integrity.go  CRC checks of hash blocks, repair by fetching them again

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
	"golang.org/x/sys/unix"
)

// Timings of proxy mode.
const (
	// lookupCacheTTL is how long the result of an upstream lookup is
	// remembered per name/rid.
	lookupCacheTTL = 120 * time.Second
	// mapSaveInterval is how long changes of a cache map may stay unsaved.
	mapSaveInterval = 10 * time.Second
	// uplinkIdleTimeout closes an uplink without client traffic (unless
	// full background replication still needs it).
	uplinkIdleTimeout = 1800 * time.Second
	// mapReloadInterval is how often a server that does not replicate an
	// incomplete image re-reads its `.map` (shared storage).
	mapReloadInterval = 30 * time.Second
	// uplinkRetryDelay is how long after a failed uplink start relays of
	// the image fail at once instead of trying again.
	uplinkRetryDelay = 2 * time.Second
	// housekeepingInterval is the period of the proxy's maintenance loop.
	housekeepingInterval = time.Second
)

// proxyHooks lets tests change timings and the view of the disk. The zero
// value means the defaults above and statfs(2).
type proxyHooks struct {
	freeSpace       func() (int64, error)
	syncData        func(*os.File) error              // fdatasync of a local copy
	writeMap        func(path string, b []byte) error // atomic write of a `.map`
	mapSaveInterval time.Duration
	uplinkIdle      time.Duration
	lruMinAge       time.Duration
	mapReload       time.Duration
}

// proxy is the server's manager of incomplete images and uplinks. It
// exists on every server (non-proxies also have incomplete images to
// save or follow), but only fetches anything with isProxy=true.
type proxy struct {
	s   *Server
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	upMu    sync.Mutex
	uplinks map[*uplink]struct{}

	lkMu    sync.Mutex
	lkCache map[imageKey]lookupEntry
	lkCalls map[imageKey]*lookupCall

	cloneMu sync.Mutex // one local copy created at a time (disk space)
	pinMu   sync.Mutex // orders pinning a reuse source (reuse.go) against LRU deletion (lru.go)

	lastReload time.Time // non-proxy map reload (housekeeping only)

	loopMu      sync.Mutex
	loopStarted bool // start was called
	loopRunning bool // the housekeeping goroutine exists
}

func newProxy(s *Server) *proxy {
	p := &proxy{
		s:       s,
		log:     s.log,
		uplinks: map[*uplink]struct{}{},
		lkCache: map[imageKey]lookupEntry{},
		lkCalls: map[imageKey]*lookupCall{},
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p
}

func (p *proxy) cfg() *Config { return p.s.config() }

func (p *proxy) saveInterval() time.Duration {
	if d := p.s.hooks.mapSaveInterval; d > 0 {
		return d
	}
	return mapSaveInterval
}

func (p *proxy) idleTimeout() time.Duration {
	if d := p.s.hooks.uplinkIdle; d > 0 {
		return d
	}
	return uplinkIdleTimeout
}

// start lets the housekeeping loop run from now on. The loop only exists
// while there is something to look after (incomplete images, uplinks).
func (p *proxy) start() {
	p.loopMu.Lock()
	p.loopStarted = true
	p.loopMu.Unlock()
	p.kick()
}

// kick starts the housekeeping loop if it is needed and not running.
// Callers change the state the loop looks after first, then kick.
func (p *proxy) kick() {
	p.loopMu.Lock()
	defer p.loopMu.Unlock()
	if !p.loopStarted || p.loopRunning || p.ctx.Err() != nil || !p.needLoop() {
		return
	}
	p.loopRunning = true
	p.wg.Add(1)
	go p.loop()
}

// needLoop reports whether uplinks or incomplete images exist.
func (p *proxy) needLoop() bool {
	p.upMu.Lock()
	n := len(p.uplinks)
	p.upMu.Unlock()
	if n > 0 {
		return true
	}
	for _, img := range p.s.store.list() {
		if img.incomplete() {
			return true
		}
	}
	return false
}

func (p *proxy) loop() {
	defer p.wg.Done()
	t := time.NewTicker(housekeepingInterval)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			p.loopMu.Lock()
			p.loopRunning = false
			p.loopMu.Unlock()
			return
		case <-t.C:
			p.housekeeping(time.Now())
		}
		p.loopMu.Lock()
		if !p.needLoop() {
			p.loopRunning = false
			p.loopMu.Unlock()
			return
		}
		p.loopMu.Unlock()
	}
}

// abort cancels lookups, relays and replication at once (the server is
// shutting down); stop then finishes the shutdown.
func (p *proxy) abort() { p.cancel() }

// stop closes every uplink and saves every cache map and `.meta`. Called
// after all client connections ended.
func (p *proxy) stop() {
	p.cancel()
	// goTracked, register and kick check the context and add to wg under
	// these locks: after taking them once, nobody adds any more.
	p.upMu.Lock()
	p.upMu.Unlock()
	p.loopMu.Lock()
	p.loopMu.Unlock()
	p.wg.Wait()
	for _, up := range p.uplinkList() {
		up.close()
	}
	for _, img := range p.s.store.list() {
		if cm := img.cache.Load(); cm != nil && cm.complete() {
			p.completed(img, cm)
		}
		if cm := img.cache.Load(); cm != nil {
			if err := p.saveMap(img, cm); err != nil {
				p.log.Error("cannot save cache map at shutdown", "image", img.String(), "err", err)
			}
		}
		if img.replica.Load() {
			p.writeMeta(img)
		}
	}
}

// goTracked runs f in a goroutine that stop waits for; false if
// stopping.
func (p *proxy) goTracked(f func()) bool {
	p.upMu.Lock()
	defer p.upMu.Unlock()
	if p.ctx.Err() != nil {
		return false
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		f()
	}()
	return true
}

func (p *proxy) register(up *uplink) bool {
	p.upMu.Lock()
	defer p.upMu.Unlock()
	if p.ctx.Err() != nil {
		return false
	}
	p.uplinks[up] = struct{}{}
	return true
}

// onLoad is called for every image the store loads.
func (s *Server) onLoad(img *image) {
	s.checker.queueLoad(img)
	if img.incomplete() {
		if s.config().IsProxy {
			s.proxy.checkWritable(img)
		}
		s.proxy.kick()
	}
}

// checkWritable flags an incomplete image whose copy or cache map a proxy
// cannot write (RPC problems 2) at once, not only at its first fetch.
func (p *proxy) checkWritable(img *image) {
	if err := copyWritable(img.Path); err != nil {
		img.problems.Or(problemWrite)
		p.log.Error("cannot write the local copy of an incomplete image: it is relayed but never completed (make it and its directory writable for the server's user)",
			"image", img.String(), "path", img.Path, "err", err)
	}
}

func (p *proxy) unregister(up *uplink) {
	p.upMu.Lock()
	delete(p.uplinks, up)
	p.upMu.Unlock()
}

func (p *proxy) uplinkList() []*uplink {
	p.upMu.Lock()
	defer p.upMu.Unlock()
	return slices.Collect(maps.Keys(p.uplinks))
}

// housekeeping saves cache maps that changed more than the save interval
// ago, closes idle uplinks, feeds uplink RTTs into the alt-server history
// and (non-proxy) follows `.map` files written by someone else.
func (p *proxy) housekeeping(now time.Time) {
	cfg := p.cfg()
	interval := mapReloadInterval
	if d := p.s.hooks.mapReload; d > 0 {
		interval = d
	}
	reload := !cfg.IsProxy && now.Sub(p.lastReload) >= interval
	if reload {
		p.lastReload = now
	}
	for _, img := range p.s.store.list() {
		cm := img.cache.Load()
		if cm == nil {
			continue
		}
		if since, dirty := cm.unsaved(); dirty && now.Sub(since) >= p.saveInterval() {
			if err := p.saveMap(img, cm); err != nil {
				p.log.Error("cannot save cache map", "image", img.String(), "err", err)
			}
			p.writeMeta(img)
		}
		if reload && img.up.Load() == nil {
			p.reloadMap(img, cm)
		}
	}
	for _, up := range p.uplinkList() {
		up.monitor()
		if up.idle(now, cfg) {
			up.log.Info("closing uplink", "reason", up.idleReason(cfg))
			up.close()
		}
	}
}

// saveMap writes img's cache map: the image data is fdatasync'ed after
// the map was copied and before the copy is written, so no bit on disk
// ever describes data that is not durable. A failure is permanent for the
// image (failSync).
func (p *proxy) saveMap(img *image, cm *cacheMap) error {
	if !img.ref() {
		return nil // unloaded meanwhile: its last save was complete
	}
	defer img.unref() // keeps the file open while it is synced
	img.saveMu.Lock()
	defer img.saveMu.Unlock()
	if err := img.syncFailed(); err != nil {
		return fmt.Errorf("not saved since a sync failed: %w", err)
	}
	if img.cache.Load() != cm {
		return nil // completed or replaced meanwhile
	}
	if _, dirty := cm.unsaved(); !dirty {
		return nil
	}
	sync := func() error { return nil } // nothing was ever written without a writer
	if w, err := img.writer(); err == nil {
		sync = func() error { return p.syncData(w) }
	}
	if err := cm.saveSynced(sync, p.mapWriter(img.Path+".map")); err != nil {
		p.failSync(img, cm, err)
		return err
	}
	return nil
}

// syncData makes the data written to a local copy durable.
func (p *proxy) syncData(w *os.File) error {
	if f := p.s.hooks.syncData; f != nil {
		return f(w)
	}
	if err := unix.Fdatasync(int(w.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", w.Name(), err)
	}
	return nil
}

// mapWriter returns the function that replaces the `.map` at path.
func (p *proxy) mapWriter(path string) func([]byte) error {
	if f := p.s.hooks.writeMap; f != nil {
		return func(b []byte) error { return f(path, b) }
	}
	return atomicMapWriter(path)
}

// failSync makes a failed sync of img's local copy or of its cache map
// permanent ("fsyncgate": the kernel may have dropped the dirty pages, and
// a retried fsync would report success). For a proxy cache safety means
// never claiming a block that may not be on disk: cm (if any) keeps only
// the blocks of the last successful save, the `.map` on disk; the copy is
// not written any more, so no block is added; the RPC shows ProblemWrite.
// Clients still get the dropped blocks, relayed from the uplink. A restart
// loads the `.map` on disk and fetches the rest again. Callers hold
// img.saveMu.
func (p *proxy) failSync(img *image, cm *cacheMap, err error) {
	first := img.syncErr.CompareAndSwap(nil, &err)
	img.problems.Or(problemWrite)
	if cm != nil {
		saved, rerr := os.ReadFile(img.Path + ".map")
		if rerr != nil {
			saved = nil // unreadable: claim nothing
		}
		cm.fail(err, saved)
	}
	if first {
		p.log.Error("sync of the local copy or its cache map failed: blocks not in the last saved map are fetched again, "+
			"and the copy is not written until the server restarts (check the disk)", "image", img.String(), "err", err)
	}
}

// writeMeta writes img's `.meta` with its last access time.
func (p *proxy) writeMeta(img *image) {
	if err := writeMeta(img.Path, time.Unix(img.atime.Load(), 0)); err != nil {
		p.log.Warn("cannot write .meta", "image", img.String(), "err", err)
	}
}

// reloadMap re-reads the `.map` of an incomplete image this server does
// not replicate itself; without the file the image is complete.
func (p *proxy) reloadMap(img *image, cm *cacheMap) {
	b, err := os.ReadFile(img.Path + ".map")
	switch {
	case errors.Is(err, os.ErrNotExist):
		if img.cache.CompareAndSwap(cm, nil) {
			p.log.Info("cache map vanished: image is complete now", "image", img.String())
		}
	case err != nil:
		p.log.Warn("cannot re-read cache map", "image", img.String(), "err", err)
	default:
		if _, dirty := cm.unsaved(); !dirty {
			cm.replace(b)
		}
	}
}

// completed finishes a replication: the image data is synced, the `.map`
// deleted and the image served as complete from then on. The uplink
// closes in the housekeeping once no fetch is outstanding.
func (p *proxy) completed(img *image, cm *cacheMap) {
	if !img.ref() {
		return
	}
	defer img.unref()
	img.saveMu.Lock()
	defer img.saveMu.Unlock()
	if img.cache.Load() != cm || !cm.complete() || img.syncFailed() != nil {
		return
	}
	if w, err := img.writer(); err == nil {
		if err := p.syncData(w); err != nil {
			p.failSync(img, cm, err) // the map is incomplete again: the .map stays
			return
		}
	}
	if err := os.Remove(img.Path + ".map"); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.log.Error("cannot delete cache map of completed image", "image", img.String(), "err", err)
		return
	}
	fsutil.SyncDir(filepath.Dir(img.Path))
	img.cache.Store(nil)
	p.writeMeta(img)
	p.log.Info(fmt.Sprintf("Replication of %s complete", img.Name), "image", img.String())
}

// selectImage resolves a SELECT_IMAGE: a loaded or on-disk image, else
// (proxy) one looked up and cloned from the uplinks. rid 0 on a proxy also
// asks the uplinks whether a newer revision exists (cached 120 s).
func (s *Server) selectImage(sel protocol.SelectImage) (*image, error) {
	cfg := s.config()
	peerServer := sel.Flags&protocol.FlagServer != 0
	peerBgRep := peerServer && sel.Flags&protocol.FlagBgRep != 0
	if !cfg.IsProxy || !protocol.ValidImageName(sel.Name) {
		return s.getImage(sel.Name, sel.RID)
	}
	// A BGR peer would replicate everything through us: we only serve it
	// images we have complete unless we replicate fully ourselves.
	needComplete := peerBgRep && cfg.BackgroundReplication != bgrFull
	mayLookup := (!peerServer || cfg.LookupMissingForProxy) && !needComplete
	var img *image
	var err error
	if sel.RID == 0 {
		if mayLookup {
			s.proxy.lookupLatest(sel.Name, peerServer)
		}
		img, err = s.getImage(sel.Name, 0)
	} else {
		img, err = s.getImage(sel.Name, sel.RID)
		if errors.Is(err, errImageNotFound) && mayLookup {
			if lerr := s.proxy.lookup(sel.Name, sel.RID, peerServer); lerr != nil {
				return nil, lerr
			}
			img, err = s.getImage(sel.Name, sel.RID)
		}
	}
	if err != nil {
		return nil, err
	}
	if needComplete && img.incomplete() {
		s.store.Release(img)
		return nil, fmt.Errorf("server: peer does background replication but %s is incomplete here and this proxy does not replicate fully", img)
	}
	return img, nil
}

// getImage is store.Get that, when the table is full of images kept by
// idle uplinks, closes the least recently used one and tries again.
func (s *Server) getImage(name string, rid uint16) (*image, error) {
	img, err := s.store.get(name, rid)
	if errors.Is(err, errTooManyImages) && s.proxy.makeRoom() {
		img, err = s.store.get(name, rid)
	}
	return img, err
}

// makeRoom closes the uplink of the least recently used image that could
// be unloaded but for its uplink (no client uses it), and saves its cache
// map, so that the store can unload it. It reports whether it closed one.
func (p *proxy) makeRoom() bool {
	var victim *image
	var up *uplink
	for _, img := range p.s.store.list() {
		u := img.up.Load()
		if u == nil || img.Users() > 0 || (!img.onDemand && !img.replica.Load()) {
			continue
		}
		if victim == nil || img.atime.Load() < victim.atime.Load() {
			victim, up = img, u
		}
	}
	if victim == nil {
		return false
	}
	up.log.Info("closing the uplink of an image without clients to make room (maxImages reached)")
	up.close()
	if cm := victim.cache.Load(); cm != nil {
		if err := p.saveMap(victim, cm); err != nil {
			p.log.Error("cannot save cache map", "image", victim.String(), "err", err)
		}
		p.writeMeta(victim)
	}
	return true
}

// errPenaltyReject is returned by proxyPenalty for a rejected connection.
var errPenaltyReject = errors.New("server: incomplete image with a congested uplink or an unwritable cache: rejecting 3 of 4 connections")

// proxyPenalty applies the handshake penalties of an incomplete image on
// a proxy (spec §5.2), which steer the RTT probes of clients to better
// servers, and starts the image's uplink.
func (s *Server) proxyPenalty(img *image) error {
	cfg := s.config()
	if !cfg.IsProxy || !img.incomplete() {
		return nil
	}
	up, _ := s.proxy.ensureUplink(img)
	writeProblem := img.problems.Load()&problemWrite != 0
	if (up != nil && up.congested()) || writeProblem {
		if rand.IntN(4) != 0 {
			return errPenaltyReject
		}
	}
	var delay time.Duration
	if up == nil || !up.connected() {
		delay = time.Duration(100-img.complete()) * 100 * time.Microsecond
	}
	if writeProblem {
		delay += 100 * time.Millisecond
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	return nil
}

// dial opens uplink connections and counts failed connects in the
// alt-server's failure counter (RPC altservers numFails).
func (p *proxy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil && ctx.Err() == nil {
		if a := p.altByAddr(addr); a != nil {
			a.recordFailure()
		}
	}
	return c, err
}

// altByAddr finds the alt-server entry of a dial address.
func (p *proxy) altByAddr(addr string) *altServer {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	for _, a := range p.s.alts {
		if netip.AddrPortFrom(a.Addr.Addr().Unmap(), a.Addr.Port()) == ap {
			return a
		}
	}
	return nil
}

// candidates returns the uplink servers for image name: alt-servers that
// are not client-only (only private ones with proxyPrivateOnly) and whose
// namespaces match, without this server itself and without servers that
// failed 20 times in a row recently; randomised when there are more than
// 4, fewest failures first, at most 8.
func (p *proxy) candidates(name string) []*altServer {
	cfg := p.cfg()
	all := uplinks(p.s.alts, cfg.ProxyPrivateOnly, name)
	self := p.s.listenAddr()
	var ok, blocked []*altServer
	for _, a := range all {
		ap := netip.AddrPortFrom(a.Addr.Addr().Unmap(), a.Addr.Port())
		if self.IsValid() && ap.Port() == self.Port() &&
			(ap.Addr() == self.Addr() || self.Addr().IsUnspecified() && ap.Addr().IsLoopback()) {
			continue
		}
		if a.blocked() {
			blocked = append(blocked, a)
			continue
		}
		ok = append(ok, a)
	}
	if len(ok) == 0 {
		ok = blocked // better a server that failed than none
	}
	if len(ok) > 4 {
		rand.Shuffle(len(ok), func(i, j int) { ok[i], ok[j] = ok[j], ok[i] })
	}
	sortStableByFails(ok)
	if len(ok) > 8 {
		ok = ok[:8]
	}
	return ok
}

func sortStableByFails(list []*altServer) {
	fails := make(map[*altServer]int, len(list))
	for _, a := range list {
		fails[a] = a.snapshot().Fails
	}
	slices.SortStableFunc(list, func(a, b *altServer) int { return cmp.Compare(fails[a], fails[b]) })
}

// candidateAddrs returns the dial addresses of candidates(name).
func (p *proxy) candidateAddrs(name string) []string {
	cands := p.candidates(name)
	addrs := make([]string, len(cands))
	for i, a := range cands {
		addrs[i] = a.Addr.String()
	}
	return addrs
}
