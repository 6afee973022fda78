package client

import (
	"fmt"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// supervise is the Image's housekeeping goroutine: it enforces read
// deadlines, detects stalled connections, sends keepalives, schedules RTT
// probes and runs failover while no connection is active.
func (i *Image) supervise() {
	defer i.wg.Done()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-i.ctx.Done():
			return
		case <-i.wake:
		case <-timer.C:
		case res := <-i.failoverRes:
			i.failoverDone(res)
		case res := <-i.probeRes:
			i.probeDone(res)
		}
		next := i.housekeeping(time.Now())
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}

// housekeeping does what is due and returns the time until the next check.
func (i *Image) housekeeping(now time.Time) time.Duration {
	i.mu.Lock()
	defer i.unlock() // expired asynchronous reads complete
	if i.closed {
		return time.Hour
	}
	i.expireLocked(now)
	if c := i.active; c != nil {
		if err := i.stalledLocked(c, now); err != nil {
			i.log.Warn("dnbd3: connection stalled", "server", c.srv.key, "err", err)
			i.dropLocked(c, err, now)
		}
	}
	next := now.Add(time.Hour)
	if c := i.active; c != nil {
		if !now.Before(i.keepaliveAt) {
			if c.kaSent.IsZero() {
				c.kaSent = now
			}
			c.sendq = append(c.sendq, protocol.Request{Cmd: protocol.CmdKeepalive})
			c.signal()
			i.keepaliveAt = now.Add(i.cfg.KeepaliveInterval)
		}
		next = earlier(next, i.keepaliveAt)
		if !i.cfg.NoProbe && !i.probeRunning {
			if i.probeAt.IsZero() {
				i.probeAt = c.since.Add(i.cfg.ProbeStartupInterval / 4)
				i.probeInterval = i.cfg.ProbeStartupInterval
			}
			if !now.Before(i.probeAt) {
				i.startProbeLocked()
			} else {
				next = earlier(next, i.probeAt)
			}
		}
		if len(i.pending) > 0 || !c.kaSent.IsZero() {
			next = earlier(next, now.Add(i.cfg.TickInterval))
		}
	} else {
		next = earlier(next, now.Add(i.cfg.TickInterval))
		if !i.failoverRunning {
			if !now.Before(i.failoverAt) {
				i.startFailoverLocked()
			} else {
				next = earlier(next, i.failoverAt)
			}
		}
	}
	return max(next.Sub(now), time.Millisecond)
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// expireLocked fails reads that have been pending longer than
// Config.Deadline. A read whose payload is being received is left alone.
func (i *Image) expireLocked(now time.Time) {
	if i.cfg.Deadline <= 0 {
		return
	}
	for _, r := range i.pending {
		if r.state != statePending || now.Sub(r.start) < i.cfg.Deadline {
			continue
		}
		cause := "no server answered"
		if i.lastError != nil {
			cause += "; last error: " + i.lastError.Error()
		}
		i.finishLocked(r, fmt.Errorf("read of %d bytes at %d of image %q: %s within %v: %w",
			len(r.buf), r.off, i.id.name, cause, i.cfg.Deadline, ErrDeadline))
	}
}

// stallThreshold is T = max(5 × RTT, StallTimeout).
func (i *Image) stallThreshold(c *conn) time.Duration {
	return max(5*c.srv.rttEstimate(), i.cfg.StallTimeout)
}

// stalledLocked reports why c counts as stalled, or nil.
func (i *Image) stalledLocked(c *conn, now time.Time) error {
	t := i.stallThreshold(c)
	idle := now.Sub(time.Unix(0, c.lastRecv.Load()))
	if c.inflight > 0 {
		var oldest time.Time
		for _, r := range i.pending {
			if r.conn == c && r.state == statePending && (oldest.IsZero() || r.sent.Before(oldest)) {
				oldest = r.sent
			}
		}
		if !oldest.IsZero() {
			age := now.Sub(oldest)
			if age > t && idle > t || age > 8*t {
				return fmt.Errorf("%w: a read has been unanswered for %v (threshold %v, nothing received for %v)",
					ErrStalled, age.Round(time.Millisecond), t, idle.Round(time.Millisecond))
			}
		}
	}
	if !c.kaSent.IsZero() && now.Sub(c.kaSent) > t && idle > t {
		return fmt.Errorf("%w: KEEPALIVE unanswered for %v", ErrStalled, now.Sub(c.kaSent).Round(time.Millisecond))
	}
	return nil
}
