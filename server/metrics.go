package server

// Prometheus metrics: counters kept where the work happens (atomics in the
// server, in each client connection and in the images), read by a
// prometheus.Collector only when /metrics is scraped. The request path
// pays one uncontended atomic add per request and two clock reads per
// read; everything else (per-image figures, clients, uplinks, disk space)
// is computed at scrape time.

import (
	"sync/atomic"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// Handshake outcomes (label outcome of dnbd3_server_handshakes_total).
const (
	hsOK          = iota // image selected, client served
	hsMalformed          // not a valid select image request
	hsUnavailable        // image unknown or not loadable
	hsRefused            // refused on purpose (proxy penalty, busy uplink)
	hsAborted            // the client left before the reply went out
	hsOutcomes
)

var handshakeOutcomes = [hsOutcomes]string{"ok", "malformed", "unavailable", "refused", "aborted"}

// Request command slots (label command of dnbd3_server_requests_total).
const (
	reqGetBlock = iota
	reqGetServers
	reqKeepalive
	reqGetCRC32
	reqSetClientMode
	reqNBDMode
	reqNBDRead
	reqNBDOther
	reqOther
	reqSlots
)

var requestCommands = [reqSlots]string{
	"get_block", "get_servers", "keepalive", "get_crc32", "set_client_mode",
	"nbd_mode", "nbd_read", "nbd_other", "other",
}

// reqSlot maps a DNBD3 command to its counter slot.
func reqSlot(cmd protocol.Cmd) int {
	switch cmd {
	case protocol.CmdGetBlock:
		return reqGetBlock
	case protocol.CmdGetServers:
		return reqGetServers
	case protocol.CmdKeepalive:
		return reqKeepalive
	case protocol.CmdGetCRC32:
		return reqGetCRC32
	case protocol.CmdSetClientMode:
		return reqSetClientMode
	case protocol.CmdNBDMode:
		return reqNBDMode
	}
	return reqOther
}

// Fetch kinds as label values of dnbd3_server_uplink_fetched_bytes_total
// (indexed by fetchKind).
var fetchKindNames = [...]string{"relay", "prefetch", "replication", "repair"}

// connStats are one client connection's counters. Only the connection's
// own goroutines write them (relay goroutines for the relay histogram).
type connStats struct {
	reqs    [reqSlots]atomic.Uint64
	disk    promhist.Hist    // replies served from the local file (sampled)
	relay   promhist.Hist    // replies that waited for an uplink
	sampler promhist.Sampler // request loop only: which disk reads to time
}

// count counts one request of slot i.
func (cs *connStats) count(i int) { cs.reqs[i].Add(1) }

// serverMetrics are the server-wide counters. Connection counters are
// folded in when a connection ends (under Server.connMu, so a scrape sees
// every request exactly once).
type serverMetrics struct {
	handshakes [hsOutcomes]atomic.Uint64
	fetched    [len(fetchKindNames)]atomic.Uint64
	checks     atomic.Uint64 // hash blocks checked
	checkFails atomic.Uint64 // hash blocks that failed
	lruDeletes atomic.Uint64 // replicated images deleted for disk space

	// guarded by Server.connMu (plain fields: folding a connection costs
	// atomic loads only)
	reqs        [reqSlots]uint64
	disk, relay promhist.Snapshot
	sentByImage map[*image]uint64 // bytes sent to clients that left
}

// handshake counts one handshake outcome.
func (m *serverMetrics) handshake(outcome int) { m.handshakes[outcome].Add(1) }

// fetchedBytes counts bytes an uplink fetch brought in.
func (m *serverMetrics) fetchedBytes(k fetchKind, n int) {
	if int(k) < len(m.fetched) {
		m.fetched[k].Add(uint64(n))
	}
}

// foldLocked adds the counters of a connection that ends to the server's
// (caller holds Server.connMu).
func (m *serverMetrics) foldLocked(cc *clientConn) {
	for i := range cc.stats.reqs {
		m.reqs[i] += cc.stats.reqs[i].Load()
	}
	m.disk.Add(&cc.stats.disk)
	m.relay.Add(&cc.stats.relay)
	if cc.img != nil {
		if m.sentByImage == nil {
			m.sentByImage = map[*image]uint64{}
		}
		m.sentByImage[cc.img] += cc.bytesSent.Load()
	}
}

// diskReply answers a GET_BLOCK (or NBD READ) from the image file: queued
// or sent (queueFromFile), with one request in promhist.SampleEvery timed
// into the disk read metric. Only the request loop calls it.
func (cc *clientConn) diskReply(handle uint64, off int64, size uint32) error {
	if !cc.stats.sampler.Next() {
		return cc.queueFromFile(handle, off, size)
	}
	t0 := promhist.Now()
	err := cc.queueFromFile(handle, off, size)
	cc.stats.disk.Observe(promhist.Now() - t0)
	return err
}

// presence returns the share of img present locally (1 for a complete
// image) and the bytes it stands for: what the status page and the
// metrics show.
func presence(img *image) (ratio float64, bytes int64) {
	cm := img.cache.Load()
	if cm == nil || cm.Blocks() == 0 {
		return 1, img.VirtualSize
	}
	present := cm.Present()
	return float64(present) / float64(cm.Blocks()), min(present*protocol.BlockSize, img.VirtualSize)
}

// fetchesInFlight returns the number of uplink fetches in flight.
func fetchesInFlight(up *uplink) int {
	up.mu.Lock()
	defer up.mu.Unlock()
	return len(up.fetches)
}
