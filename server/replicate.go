package server

// Background replication: while an uplink exists for an incomplete image
// and no client request waits on it, the proxy fetches the absent parts
// of the image on its own.
//
//   - backgroundReplication=true: every 32 KiB map byte that is not all
//     present, in order from where the last request ended, wrapping
//     around, with bgrWindowSize requests in flight; the window starts at
//     1 again after client activity and grows by one per completed
//     request (slow start).
//   - hashblock: the same, but only inside 16 MiB hash blocks that are
//     partially present, so every hash block a client touched becomes
//     complete and checkable.
//   - false: nothing.
//
// Requests carry hop byte 0x81 (one proxy passed, replication flag), or
// 0x41 (prefetch flag) with pretendClient. Replication runs only while the
// image has at least bgrMinClients users. Hash blocks that are being
// copied from the previous revision (reuse.go) are skipped until that
// walk ends.

import (
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// bgrChunk is the size of one background replication request: the 4 KiB
// blocks of one map byte.
const bgrChunk = 8 * protocol.BlockSize

// bgrHops returns the hop byte of the proxy's own replication requests.
func bgrHops(cfg *Config) uint8 {
	if cfg.PretendClient {
		return protocol.HopFlagPrefetch | 1
	}
	return protocol.HopFlagBgRep | 1
}

// replicate is the uplink's background replication goroutine.
func (up *uplink) replicate() {
	img := up.img
	var cursor int64 // next map byte to look at
	window := 1
	seenDone := 0
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-up.ctx.Done():
			return
		case <-up.bgrWake:
		case <-t.C:
		}
		cm := img.cache.Load()
		if cm == nil {
			continue // complete; a failed hash check may make it incomplete again
		}
		cfg := up.p.cfg()
		if cfg.BackgroundReplication == bgrOff || img.Users() < cfg.BGRMinClients || img.syncFailed() != nil {
			continue // (after a failed sync nothing fetched would be kept)
		}
		clientBusy, done, inflight := up.bgrState()
		if clientBusy {
			window = 1
			seenDone = done
			continue
		}
		window = min(window+done-seenDone, max(cfg.BGRWindowSize, 1))
		seenDone = done
		cursor = up.fillWindow(cm, cfg, cursor, inflight, window)
	}
}

// bgrState returns whether a client waits for the uplink, how many
// replication fetches have completed so far and how many are in flight.
func (up *uplink) bgrState() (clientBusy bool, done, inflight int) {
	up.mu.Lock()
	defer up.mu.Unlock()
	for _, f := range up.fetches {
		if f.kind == fetchBGR {
			inflight++
		}
	}
	return up.clientWait > 0, up.bgrCompleted, inflight
}

// fillWindow starts replication fetches of absent chunks from cursor (a
// chunk index) on until window fetches are in flight, skipping the hash
// blocks a reuse walk copies (reuse.go). It returns where to go on next
// time.
func (up *uplink) fillWindow(cm *cacheMap, cfg *Config, cursor int64, inflight, window int) int64 {
	chunk := int64(bgrChunk)
	if cfg.MinRequestSize > chunk {
		chunk = (cfg.MinRequestSize + bgrChunk - 1) / bgrChunk * bgrChunk
	}
	hops := bgrHops(cfg)
	partial := cfg.BackgroundReplication == bgrHashblock
	for skips := 0; inflight < window && skips < 64; {
		idx, ok := cm.nextChunk(cursor, partial)
		if !ok {
			break
		}
		start := idx * bgrChunk
		if plan := up.reuse.Load(); plan != nil && plan.reserved(start) {
			// copied from the previous revision (reuse.go): skip the hash block
			cursor = plan.after(start) / bgrChunk
			skips++
			continue
		}
		end := min(start+chunk, up.img.VirtualSize)
		cursor = (end + bgrChunk - 1) / bgrChunk
		switch up.startBGR(start, end, hops) {
		case bgrStarted:
			inflight++
		case bgrBusy:
			skips++
		case bgrStop:
			skips = 64
		}
	}
	return cursor
}

type bgrResult uint8

const (
	bgrStarted bgrResult = iota
	bgrBusy              // a fetch in flight covers part of the range
	bgrStop              // closing or queue full
)

// startBGR queues a replication fetch of [start, end) unless something in
// flight overlaps it or it became present meanwhile (a fetch sets its map
// bits before it leaves the queue, so under up.mu one of the two shows).
func (up *uplink) startBGR(start, end int64, hops uint8) bgrResult {
	up.mu.Lock()
	defer up.mu.Unlock()
	if up.closing || len(up.fetches) >= uplinkQueueMax || up.clientWait > 0 {
		return bgrStop
	}
	for _, f := range up.fetches {
		if f.start < end && f.end > start {
			return bgrBusy
		}
	}
	if cm := up.img.cache.Load(); cm == nil || cm.has(start, end) {
		return bgrBusy
	}
	up.newFetchLocked(start, end, hops, fetchBGR)
	return bgrStarted
}
