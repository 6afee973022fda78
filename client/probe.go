package client

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"time"
)

// RTT probing follows the kernel client's discovery scheme (spec §10.2):
//
//   - A probe is a new TCP connection to a server: SELECT_IMAGE with the
//     image's name and resolved revision (flags as configured), then
//     GET_BLOCK 4096 @ 0 with handle 0, whose reply must be cmd 1, size
//     4096, handle 0. Its RTT is the time from starting the connect to the
//     end of the data; a server's RTT is the average of its last 4 probes.
//   - Startup phase: the first ProbeStartupRounds (6) rounds after a
//     (re)connect probe every server, every ProbeStartupInterval (2 s); the
//     first round starts a quarter interval after connecting.
//   - Then each round probes the current server and ProbeServers (3) random
//     others; the period grows by ProbeIntervalStep (2 s) per round up to
//     ProbeMaxInterval (45 s), and restarts at ProbeAfterSwitch (10 s)
//     after a switch.
//   - After every round the fastest server that answered this round earns
//     bestCount += 3 (max 178), the others lose 1. The Image switches to it
//     when 3/4 × current RTT > best RTT + threshold, threshold =
//     SwitchThreshold (1.8 ms) − 10 µs × bestCount (not below 0). Unlike the
//     kernel it may switch during the startup phase already. The probe
//     connection becomes the active connection, the old one is closed and
//     its unanswered reads are re-sent on the new one; GET_SERVERS is sent
//     again.
//   - Probing pauses in panic mode (failover.go has its own rounds).

type probeResult struct {
	srv *server
	d   *dialed
	err error
}

// startProbeLocked starts a probe round in the background.
func (i *Image) startProbeLocked() {
	c := i.active
	if c == nil || i.closed {
		return
	}
	i.probeRunning = true
	targets := []*server{c.srv}
	others := make([]*server, 0, len(i.servers))
	for _, s := range i.servers {
		if s != c.srv {
			others = append(others, s)
		}
	}
	rand.Shuffle(len(others), func(a, b int) { others[a], others[b] = others[b], others[a] })
	if i.probeRounds >= i.cfg.ProbeStartupRounds && len(others) > i.cfg.ProbeServers {
		others = others[:i.cfg.ProbeServers]
	}
	targets = append(targets, others...)
	timeout := max(i.cfg.ProbeTimeout, 4*c.srv.rttEstimate())
	i.wg.Add(1)
	go func() {
		defer i.wg.Done()
		results := make(chan probeResult, len(targets))
		for _, s := range targets {
			go func() {
				d, err := probe(i.ctx, i.cfg.Dial, s, i.id, i.cfg.SelectFlags, timeout)
				results <- probeResult{srv: s, d: d, err: err}
			}()
		}
		out := make([]probeResult, 0, len(targets))
		for range targets {
			out = append(out, <-results)
		}
		i.probeRes <- out // cap 1 and one round at a time: never blocks
	}()
}

// probeDone records a round's RTTs and switches to a clearly faster server.
func (i *Image) probeDone(results []probeResult) {
	now := time.Now()
	i.mu.Lock()
	defer i.mu.Unlock()
	i.probeRunning = false
	keep := map[*dialed]bool{}
	defer func() {
		for _, r := range results {
			if r.d != nil && !keep[r.d] {
				r.d.close()
			}
		}
	}()
	if i.closed {
		return
	}
	var ok []probeResult
	for _, r := range results {
		if !slices.Contains(i.servers, r.srv) {
			continue // removed while the round ran
		}
		if r.err != nil {
			if i.ctx.Err() == nil {
				r.srv.fail(r.err, now)
				i.log.Debug("dnbd3: probe failed", "server", r.srv.key, "err", r.err)
			}
			continue
		}
		r.srv.addSample(r.d.rtt)
		ok = append(ok, r)
	}
	i.probeRounds++
	switch {
	case i.probeRounds < i.cfg.ProbeStartupRounds:
		i.probeInterval = i.cfg.ProbeStartupInterval
	default:
		i.probeInterval = min(i.probeInterval+i.cfg.ProbeIntervalStep, i.cfg.ProbeMaxInterval)
	}
	defer func() { i.probeAt = now.Add(i.probeInterval) }()
	if len(ok) == 0 {
		return
	}
	slices.SortFunc(ok, func(a, b probeResult) int { return cmp.Compare(a.srv.avgRTT(), b.srv.avgRTT()) })
	best := ok[0]
	for _, s := range i.servers {
		if s == best.srv {
			s.best = min(s.best+3, maxBestCount)
		} else if s.best > 0 {
			s.best--
		}
	}
	c := i.active
	if c == nil {
		// The connection broke while probing: a probed server is as good
		// as a failover.
		i.failovers.Add(1)
		i.log.Info("dnbd3: failed over via probe", "server", best.srv.key)
		keep[best.d] = true
		i.adoptLocked(best.d, "probe during panic")
		return
	}
	if best.srv == c.srv || i.pinned == c.srv {
		return // already there, or pinned by SwitchServer
	}
	cur, bestRTT := c.srv.avgRTT(), best.srv.avgRTT()
	thr := max(i.cfg.SwitchThreshold-time.Duration(best.srv.best)*10*time.Microsecond, 0)
	if cur == 0 || 3*cur/4 <= bestRTT+thr {
		return
	}
	i.switches.Add(1)
	i.log.Info("dnbd3: switching to faster server", "from", c.srv.key, "fromRTT", cur, "to", best.srv.key, "toRTT", bestRTT)
	keep[best.d] = true
	i.adoptLocked(best.d, "faster server")
	i.probeInterval = i.cfg.ProbeAfterSwitch
}
