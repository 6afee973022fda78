package server

// Relaying: a client read of blocks the local copy does not have yet.
//
// The request loop of the client connection checks the refusal rules,
// widens the request to the 4 KiB-aligned covering range (at least
// minRequestSize) and hands it to the image's uplink as a relay. The
// uplink keeps its fetches in flight in a list (at most 500); the relay
// attaches to a fetch that covers its whole range (at most 32 clients per
// fetch), else new fetches are started for the absent runs of the range
// that no fetch in flight covers, and the relay waits for all fetches it
// overlaps. The request loop goes on reading and answering other requests
// meanwhile.
//
// A fetch runs in its own goroutine: it reads its range from the uplink
// with the client library (hop count + 1, the request's flag bits kept),
// writes it to the local file, sets the map bits and then completes its
// relays. A relay answered by one fetch gets the fetch's buffer; a relay
// assembled from several fetches (and blocks that were present) is sent
// from the local file. Replies of relays go out from these goroutines, so
// every reply on a connection is written whole under the connection's
// write lock, and replies arrive out of order, matched by handle.

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"slices"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// errQueueFull is returned when the uplink has too many fetches in flight.
var errQueueFull = errors.New("server: uplink queue full")

// fetchKind says why a fetch was started.
type fetchKind uint8

const (
	fetchClient   fetchKind = iota // a client's request
	fetchPrefetch                  // prefetch after a client request
	fetchBGR                       // background replication
	fetchRepair                    // a hash block that failed its check
	fetchReuse                     // a hash block copied from the previous revision (reuse.go)
)

// fetch is one range in flight on an uplink. The fields after hops are
// guarded by uplink.mu, except buf and err, which are set before done.
type fetch struct {
	start, end int64
	hops       uint8
	kind       fetchKind

	waiters []*relay
	client  bool // counted in uplink.clientWait
	buf     []byte
	err     error
	refs    atomic.Int32 // users of buf after the fetch completed (finish)
}

// relay is a client GET_BLOCK waiting for uplink data, or (done set, cc
// nil) an iSCSI read waiting for the same.
type relay struct {
	cc     *clientConn
	done   chan struct{} // closed when every fetch completed (iSCSI)
	img    *image        // iSCSI: the image read
	data   []byte        // iSCSI: the data if only the fetch's buffer had it (keepData)
	handle uint64
	off    int64
	size   uint32
	single *fetch       // the fetch whose buffer answers it, nil: send from file
	start  time.Time    // when the request arrived (latency metric)
	parts  atomic.Int32 // fetches still to complete
	failed atomic.Bool
}

// relay handles a GET_BLOCK whose data is not all present locally. A nil
// error means the request is answered or will be; a non-nil one ends the
// connection.
func (cc *clientConn) relay(req protocol.Request) error {
	img := cc.img
	cfg := cc.srv.config()
	hops := req.Hops
	if !cfg.IsProxy {
		// A non-proxy has nobody to fetch from: the client may try another
		// server.
		cc.logAt(slog.LevelDebug, "read of blocks an incomplete image does not have; not a proxy", "image", img.String(), "offset", req.Offset, "size", req.Size)
		return cc.sendReply(protocol.CmdError, req.Handle, nil)
	}
	if err := checkRelayable(req, cfg); err != nil {
		return err
	}
	up, err := cc.srv.proxy.ensureUplink(img)
	if err != nil {
		cc.failRelayed(req.Handle)
		return refuse("no uplink for an uncached request", "image", img.String(), "err", err)
	}
	if protocol.HopCount(hops) > 1 {
		if cur := up.current.load(); cur.IsValid() && cur.Addr() == cc.addr.Addr() {
			return refuse("proxy cycle: relayed request came from our own uplink's address", "hops", protocol.HopCount(hops), "uplink", cur)
		}
	}
	start := int64(req.Offset) &^ (protocol.BlockSize - 1)
	end := protocol.VirtualSize(int64(req.Offset) + int64(req.Size))
	end = fetchEnd(cfg, img.VirtualSize, start, end)
	outHops := hops&^protocol.HopCountMask | uint8(protocol.HopCount(hops)+1)
	r := &relay{cc: cc, handle: req.Handle, off: int64(req.Offset), size: req.Size, start: time.Now()}
	cc.relays.Add(1)
	ready, err := up.request(r, start, end, outHops)
	if err != nil || ready {
		cc.relays.Add(-1)
	}
	switch {
	case errors.Is(err, errQueueFull):
		return refuse("uplink queue full", "image", img.String())
	case err != nil:
		cc.failRelayed(req.Handle)
		return refuse("uplink gone", "image", img.String(), "err", err)
	case ready:
		return cc.sendFromFile(req.Handle, int64(req.Offset), req.Size)
	}
	// Prefetch after client requests; never after prefetch or replication
	// requests of other proxies (no cascading).
	if hops&(protocol.HopFlagPrefetch|protocol.HopFlagBgRep) == 0 && int64(req.Size) <= cfg.MaxPrefetch {
		up.prefetchAfter(cfg, end, end-start, outHops)
	}
	return nil
}

// fetchEnd returns the end of the uplink fetch for the 4 KiB-aligned
// client range [start, end) of an image of size bytes: at least
// minRequestSize long, within the image.
func fetchEnd(cfg *Config, size, start, end int64) int64 {
	if cfg.MinRequestSize > 0 && end-start < cfg.MinRequestSize {
		end = max(end, min(protocol.VirtualSize(start+cfg.MinRequestSize), size))
	}
	return end
}

// checkRelayable refuses requests a proxy does not relay: larger than
// maxPayload, through too many proxies, or background replication of a
// peer when this proxy does not replicate fully.
func checkRelayable(req protocol.Request, cfg *Config) error {
	hops := req.Hops
	switch {
	case int64(req.Size) > cfg.MaxPayload:
		return refuse("uncached request larger than maxPayload", "size", req.Size, "maxPayload", cfg.MaxPayload)
	case protocol.HopCount(hops) > protocol.MaxHops:
		return refuse("request passed too many proxies", "hops", protocol.HopCount(hops))
	case hops&protocol.HopFlagBgRep != 0 && cfg.BackgroundReplication != bgrFull:
		return refuse("background replication request from a peer, but this proxy does not replicate fully")
	}
	return nil
}

// prefetchAfter prefetches what follows a client's read of span bytes
// that was relayed with hops and ends at end: three times span, at most
// maxPrefetch, within the image.
func (up *uplink) prefetchAfter(cfg *Config, end, span int64, hops uint8) {
	if cfg.MaxPrefetch <= 0 {
		return
	}
	n := protocol.VirtualSize(min(3*span, cfg.MaxPrefetch))
	if pend := min(end+n, up.img.VirtualSize); pend > end {
		up.prefetch(end, pend, hops|protocol.HopFlagPrefetch)
	}
}

// request registers relay r for the 4 KiB-aligned range [start, end).
// ready means everything is present by now: the caller serves r from the
// file itself.
func (up *uplink) request(r *relay, start, end int64, hops uint8) (ready bool, err error) {
	up.mu.Lock()
	defer up.mu.Unlock()
	if up.closing {
		return false, errUplinkGone
	}
	up.lastClient = time.Now()
	for _, f := range up.fetches {
		if f.start <= start && f.end >= end && len(f.waiters) < maxFetchWaiters {
			r.single = f
			r.parts.Store(1)
			up.attachLocked(f, r)
			return false, nil
		}
	}
	cm := up.img.cache.Load()
	if cm == nil {
		return true, nil
	}
	gaps, overlaps := up.gapsLocked(cm, start, end)
	if len(gaps) == 0 && len(overlaps) == 0 {
		return true, nil
	}
	if len(up.fetches)+len(gaps) > uplinkQueueMax {
		return false, errQueueFull
	}
	// Without a writable copy (ProblemWrite, e.g. after a failed sync)
	// fetched data never reaches the file: one fetch of the whole range
	// answers from its own buffer.
	whole := len(gaps) == 1 && len(overlaps) == 0 && gaps[0] == [2]int64{start, end}
	if whole || up.img.problems.Load()&problemWrite != 0 || up.img.syncFailed() != nil {
		f := up.newFetchLocked(start, end, hops, fetchClient)
		r.single = f
		r.parts.Store(1)
		up.attachLocked(f, r)
		return false, nil
	}
	r.parts.Store(int32(len(gaps) + len(overlaps)))
	for _, f := range overlaps {
		up.attachLocked(f, r)
	}
	for _, g := range gaps {
		up.attachLocked(up.newFetchLocked(g[0], g[1], hops, fetchClient), r)
	}
	return false, nil
}

// prefetch fetches the absent blocks of [start, end) that nothing in
// flight covers, unless the queue is congested.
func (up *uplink) prefetch(start, end int64, hops uint8) {
	up.mu.Lock()
	defer up.mu.Unlock()
	cm := up.img.cache.Load()
	if up.closing || cm == nil {
		return
	}
	gaps, _ := up.gapsLocked(cm, start, end)
	for _, g := range gaps {
		if len(up.fetches) >= uplinkCongested {
			return
		}
		up.newFetchLocked(g[0], g[1], hops, fetchPrefetch)
	}
}

// repair fetches [start, end) again (a hash block that failed its check),
// in chunks, whatever the replication mode. It reports false if the
// uplink is closing.
func (up *uplink) repair(start, end int64, hops uint8) bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	cm := up.img.cache.Load()
	if up.closing {
		return false
	}
	if cm == nil {
		return true
	}
	const chunk = 1 << 20
	gaps, _ := up.gapsLocked(cm, start, end)
	for _, g := range gaps {
		for s := g[0]; s < g[1]; s += chunk {
			up.newFetchLocked(s, min(s+chunk, g[1]), hops, fetchRepair)
		}
	}
	return true
}

// gapsLocked returns the absent runs of [start, end) that no fetch in
// flight covers, and the fetches in flight that cover absent blocks of
// the range.
func (up *uplink) gapsLocked(cm *cacheMap, start, end int64) (gaps [][2]int64, overlaps []*fetch) {
	missing := cm.missing(start, end)
	if len(missing) == 0 {
		return nil, nil
	}
	gaps = missing
	for _, f := range up.fetches {
		if f.end <= missing[0][0] || f.start >= missing[len(missing)-1][1] {
			continue
		}
		covers := false
		for _, m := range missing {
			if f.start < m[1] && f.end > m[0] {
				covers = true
				break
			}
		}
		if !covers {
			continue
		}
		overlaps = append(overlaps, f)
		gaps = subtractRange(gaps, f.start, f.end)
	}
	return gaps, overlaps
}

// subtractRange removes [s, e) from a sorted list of disjoint ranges.
func subtractRange(list [][2]int64, s, e int64) [][2]int64 {
	var out [][2]int64
	for _, r := range list {
		if e <= r[0] || s >= r[1] {
			out = append(out, r)
			continue
		}
		if r[0] < s {
			out = append(out, [2]int64{r[0], s})
		}
		if e < r[1] {
			out = append(out, [2]int64{e, r[1]})
		}
	}
	return out
}

func (up *uplink) attachLocked(f *fetch, r *relay) {
	f.waiters = append(f.waiters, r)
	if !f.client {
		f.client = true
		up.clientWait++
	}
}

// newFetchLocked queues a fetch and starts its goroutine. The caller
// holds up.mu and checked that the uplink is not closing.
func (up *uplink) newFetchLocked(start, end int64, hops uint8, kind fetchKind) *fetch {
	f := &fetch{start: start, end: end, hops: hops, kind: kind}
	up.fetches = append(up.fetches, f)
	up.wg.Add(1)
	go up.run(f)
	return f
}

// run performs a fetch: read from the uplink, store, complete the relays.
func (up *uplink) run(f *fetch) {
	defer up.wg.Done()
	select {
	case <-up.ready:
	case <-up.ctx.Done():
	}
	var err error
	n := f.end - f.start
	switch {
	case up.ctx.Err() != nil:
		err = errUplinkGone
	case up.ci == nil:
		err = up.err
	case !up.budget.acquire(n):
		err = errUplinkGone
	default:
		defer up.budget.release(n) // after the replies below went out
		buf := up.p.s.fetchBufs.get(int(n))
		if _, err = up.ci.ReadAtHops(up.ctx, buf, f.start, f.hops); err == nil {
			f.buf = buf
			up.store(f)
		} else {
			up.p.s.fetchBufs.put(buf)
		}
	}
	if err != nil {
		f.err = err
		if up.ctx.Err() == nil {
			up.log.Warn("uplink request failed", "offset", f.start, "size", f.end-f.start, "err", err)
		}
	}
	up.finish(f)
	up.releaseBuf(f)
}

// releaseBuf drops one user of f's buffer; the last one returns it to the
// pool.
func (up *uplink) releaseBuf(f *fetch) {
	if f.refs.Add(-1) == 0 && f.buf != nil {
		up.p.s.fetchBufs.put(f.buf)
	}
}

// store writes a fetch's data to the local copy and sets its map bits.
// Hash blocks it completed are queued for a CRC check; a complete map
// finishes the replication.
func (up *uplink) store(f *fetch) {
	img := up.img
	n := uint64(len(f.buf))
	img.bytesRecv.Add(n)
	up.p.s.bytesRecv.Add(n)
	up.p.s.met.fetchedBytes(f.kind, len(f.buf))
	w, err := img.writer()
	if err == nil {
		_, err = w.WriteAt(f.buf, f.start)
	}
	if err != nil {
		if img.problems.Load()&problemWrite == 0 {
			up.log.Error("cannot write to the local copy; serving from memory only", "err", err)
		}
		img.problems.Or(problemWrite)
		return
	}
	if img.problems.Load()&problemWrite != 0 {
		img.problems.And(^uint32(problemWrite))
	}
	cm := img.cache.Load()
	if cm == nil {
		return
	}
	completed, hbs := cm.setRange(f.start, f.end)
	for _, hb := range hbs {
		up.p.s.checker.queue(img, hb)
	}
	if completed {
		up.p.goTracked(func() { up.p.completed(img, cm) })
	}
}

// finish takes a completed fetch off the queue and completes its relays.
func (up *uplink) finish(f *fetch) {
	up.mu.Lock()
	if i := slices.Index(up.fetches, f); i >= 0 {
		up.fetches = slices.Delete(up.fetches, i, i+1)
	}
	if f.client {
		up.clientWait--
	}
	if f.kind == fetchBGR {
		up.bgrCompleted++
	}
	waiters := f.waiters
	f.waiters = nil
	// Replies to several clients go out in parallel: a slow client must
	// not hold up the others. (The counter is > 0 here, so Add may race
	// with close's Wait.)
	if len(waiters) > 1 {
		up.wg.Add(len(waiters) - 1)
	}
	up.mu.Unlock()
	select {
	case up.bgrWake <- struct{}{}:
	default:
	}
	// The buffer goes back to the pool once run and every reply are done
	// with it.
	f.refs.Store(int32(len(waiters)) + 1)
	for i, r := range waiters {
		if i == len(waiters)-1 {
			r.partDone(f)
			up.releaseBuf(f)
			break
		}
		go func() {
			defer up.wg.Done()
			r.partDone(f)
			up.releaseBuf(f)
		}()
	}
}

// partDone records that one of r's fetches completed; the last one sends
// the reply.
func (r *relay) partDone(f *fetch) {
	if f.err != nil {
		r.failed.Store(true)
	}
	if r.parts.Add(-1) == 0 {
		if r.done != nil {
			r.keepData()
			close(r.done)
			return
		}
		r.cc.finishRelay(r)
	}
}

// keepData copies an iSCSI read's range out of its single fetch's
// buffer when the data is nowhere else (the local copy could not be
// written): the buffer goes back to the pool once the fetch is done,
// before the waiting reader runs.
func (r *relay) keepData() {
	start, end := r.off, r.off+int64(r.size)
	if r.failed.Load() {
		return
	}
	if cm := r.img.cache.Load(); cm == nil || cm.has(start, end) {
		return
	}
	if f := r.single; f != nil && f.buf != nil && f.start <= start && f.end >= end {
		r.data = bytes.Clone(f.buf[start-f.start : end-f.start])
	}
}

// finishRelay answers a relayed request whose fetches all completed: from
// the single fetch's buffer, else from the local file; CMD_ERROR (and the
// connection shut down) if the data could not be fetched.
func (cc *clientConn) finishRelay(r *relay) {
	defer func() {
		cc.stats.relay.Observe(time.Since(r.start))
		cc.relays.Add(-1)
		select {
		case cc.relayDone <- struct{}{}:
		default:
		}
	}()
	var err error
	switch {
	case r.failed.Load():
		msg := "relayed request failed, answering CMD_ERROR and closing"
		if cc.nbd.Load() {
			msg = "relayed request failed, closing the NBD connection (no error reply: the kernel re-sends the read)"
		}
		cc.logAt(slog.LevelInfo, msg, "offset", r.off, "size", r.size)
		cc.failRelayed(r.handle)
		return
	case r.single != nil && r.single.buf != nil:
		f := r.single
		err = cc.sendData(r.handle, f.buf[r.off-f.start:r.off-f.start+int64(r.size)])
	default:
		if cm := cc.img.cache.Load(); cm != nil && !cm.has(r.off, r.off+int64(r.size)) {
			cc.logAt(slog.LevelWarn, "relayed data not in the local copy (write failed?), answering CMD_ERROR", "offset", r.off, "size", r.size)
			cc.failRelayed(r.handle)
			return
		}
		err = cc.sendFromFile(r.handle, r.off, r.size)
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		cc.c.Close() // the request loop notices and ends
	}
}
