package client

import (
	"context"
	"errors"
	"net"
	"slices"
	"time"
)

// Panic mode: when the active connection breaks, stalls or answers a read
// with CMD_ERROR, the Image has no active connection ("panic", as in the
// reference). The supervisor then at once starts a failover round: a
// connection attempt (TCP connect and SELECT_IMAGE requiring the same
// name, revision and size) to every known server in parallel; servers that
// failed recently start FailedServerDelay later when a healthy one exists.
// The first server that completes the handshake becomes the active
// connection and every unanswered read is re-sent there. While no server
// answers, rounds repeat with exponential backoff from FailoverRetryMin to
// FailoverRetryMax. Reads keep waiting meanwhile and fail only at
// Config.Deadline (if set).

type failoverResult struct {
	d    *dialed
	errs []serverError
	took time.Duration
}

type serverError struct {
	srv *server
	err error
}

// startFailoverLocked starts a failover round in the background.
func (i *Image) startFailoverLocked() {
	if i.closed {
		return
	}
	i.failoverRunning = true
	servers := slices.Clone(i.servers)
	healthy := false
	for _, s := range servers {
		if s.consec == 0 {
			healthy = true
		}
	}
	delays := make([]time.Duration, len(servers))
	for k, s := range servers {
		if healthy && s.consec > 0 {
			delays[k] = i.cfg.FailedServerDelay
		}
	}
	i.wg.Add(1)
	go func() {
		defer i.wg.Done()
		start := time.Now()
		d, errs := raceHandshakes(i.ctx, i.cfg.Dial, servers, delays, i.id, i.cfg.SelectFlags, i.cfg.FailoverConnectTimeout, nil)
		if i.ctx.Err() != nil {
			errs = nil // closing: the attempts were cancelled, not the servers' fault
		}
		i.failoverRes <- failoverResult{d: d, errs: errs, took: time.Since(start)} // cap 1 and one round at a time: never blocks
	}()
}

// errNotTried marks a server whose attempt never started.
var errNotTried = errors.New("client: not tried")

// raceHandshakes starts a handshake for want with every server, server k
// after delays[k] (none without delays), and returns the first that
// succeeds, and for which then (if not nil) succeeds too; then closes the
// connection it fails. The other attempts are cancelled and their
// connections closed. errs lists, in the order they came in, the failures
// before the winner; an attempt cancelled before it started fails with
// errNotTried.
func raceHandshakes(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), servers []*server, delays []time.Duration, want identity, flags uint8, timeout time.Duration, then func(context.Context, *dialed) error) (win *dialed, errs []serverError) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		srv *server
		d   *dialed
		err error
	}
	results := make(chan result, len(servers))
	for k, s := range servers {
		go func() {
			if k < len(delays) && delays[k] > 0 {
				t := time.NewTimer(delays[k])
				select {
				case <-ctx.Done():
					t.Stop()
					results <- result{srv: s, err: errNotTried}
					return
				case <-t.C:
				}
			}
			d, err := handshake(ctx, dial, s, want, flags, timeout)
			if err == nil && then != nil {
				if err = then(ctx, d); err != nil {
					d = nil
				}
			}
			results <- result{srv: s, d: d, err: err}
		}()
	}
	for range servers {
		r := <-results
		switch {
		case r.err == nil && win == nil:
			win = r.d
			cancel() // stop the others; keep collecting so none leaks
		case r.err == nil:
			r.d.close()
		case win == nil:
			errs = append(errs, serverError{r.srv, r.err})
		}
	}
	return win, errs
}

// failoverDone adopts the result of a failover round or schedules the next.
func (i *Image) failoverDone(res failoverResult) {
	now := time.Now()
	i.mu.Lock()
	defer i.mu.Unlock()
	i.failoverRunning = false
	for _, e := range res.errs {
		e.srv.fail(e.err, now)
	}
	if i.closed {
		res.d.close()
		return
	}
	if res.d != nil {
		if i.active != nil {
			res.d.close() // a probe got there first
			return
		}
		if !slices.Contains(i.servers, res.d.srv) {
			res.d.close() // removed while the round ran: try the others now
			i.failoverAt = now
			return
		}
		i.failovers.Add(1)
		i.log.Info("dnbd3: failed over", "server", res.d.srv.key, "panic", now.Sub(i.panicSince).Round(time.Millisecond),
			"connect", res.took.Round(time.Microsecond), "pending", len(i.pending))
		i.adoptLocked(res.d, "failover")
		return
	}
	i.growFailoverBackoff()
	i.failedRounds++
	if i.failedRounds == 1 {
		attrs := []any{"servers", serverKeys(i.servers), "retry", i.failoverBackoff}
		for _, e := range res.errs {
			attrs = append(attrs, e.srv.key, e.err.Error())
		}
		i.log.Warn("dnbd3: no server reachable, retrying", attrs...)
	} else {
		i.log.Debug("dnbd3: still no server reachable", "rounds", i.failedRounds, "retry", i.failoverBackoff)
	}
	if len(res.errs) > 0 {
		i.lastError = res.errs[len(res.errs)-1].err
	}
	i.failoverAt = now.Add(i.failoverBackoff)
}

// growFailoverBackoff doubles the wait before the next failover round,
// within FailoverRetryMin and FailoverRetryMax.
func (i *Image) growFailoverBackoff() {
	i.failoverBackoff = min(max(2*i.failoverBackoff, i.cfg.FailoverRetryMin), i.cfg.FailoverRetryMax)
}
