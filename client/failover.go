package client

import (
	"context"
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
		res := i.connectAny(i.ctx, servers, delays, i.cfg.FailoverConnectTimeout)
		res.took = time.Since(start)
		i.failoverRes <- res // cap 1 and one round at a time: never blocks
	}()
}

// connectAny tries every server in parallel (each after its delay) and
// returns the first that completes the handshake with the image's
// identity. The other attempts are cancelled and their connections closed.
func (i *Image) connectAny(ctx context.Context, servers []*server, delays []time.Duration, timeout time.Duration) failoverResult {
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
			if delays[k] > 0 {
				t := time.NewTimer(delays[k])
				select {
				case <-ctx.Done():
					t.Stop()
					results <- result{srv: s, err: context.Cause(ctx)}
					return
				case <-t.C:
				}
			}
			d, err := handshake(ctx, i.cfg.Dial, s, i.id, i.cfg.SelectFlags, timeout)
			results <- result{srv: s, d: d, err: err}
		}()
	}
	var res failoverResult
	for range servers {
		r := <-results
		switch {
		case r.err == nil && res.d == nil:
			res.d = r.d
			cancel()
		case r.err == nil:
			r.d.close()
		case res.d == nil && ctx.Err() == nil:
			res.errs = append(res.errs, serverError{r.srv, r.err})
		}
	}
	return res
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
		i.failovers.Add(1)
		i.log.Info("dnbd3: failed over", "server", res.d.srv.key, "panic", now.Sub(i.panicSince).Round(time.Millisecond),
			"connect", res.took.Round(time.Microsecond), "pending", len(i.pending))
		i.adoptLocked(res.d, "failover")
		return
	}
	i.failoverBackoff = min(max(2*i.failoverBackoff, i.cfg.FailoverRetryMin), i.cfg.FailoverRetryMax)
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
