// Package sdnotify tells systemd how a Type=notify service is doing
// (sd_notify(3)): READY=1 once it serves, STATUS= lines that
// `systemctl status` shows, WATCHDOG=1 keep-alives when the unit sets
// WatchdogSec=, and STOPPING=1 when it shuts down.
//
// The datagrams are sent with github.com/coreos/go-systemd/v22/daemon.
// Outside systemd (NOTIFY_SOCKET unset) every call does nothing, so the
// daemons call it unconditionally.
package sdnotify

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// DefaultInterval is how often Start refreshes the STATUS= line when
// Options.Interval is zero.
const DefaultInterval = 10 * time.Second

// Options configure Start.
type Options struct {
	// Status returns the current one-line status, e.g. "serving 12
	// images, 340 clients". It is called at start and every Interval; a
	// line equal to the last one sent is not sent again. Nil sends no
	// STATUS= lines.
	Status func() string
	// Interval between status refreshes; DefaultInterval when zero.
	Interval time.Duration
	// Logger receives one warning if the notify socket cannot be written
	// (nil: slog.Default()).
	Logger *slog.Logger
}

// Notifier is a running notifier; see Start.
type Notifier struct {
	opts     Options
	watchdog time.Duration // WATCHDOG_USEC for this process, 0 if none
	cancel   context.CancelFunc
	done     chan struct{} // closed when the loop has ended
	stopOnce sync.Once
	warnOnce sync.Once
	last     string // last STATUS line sent (loop goroutine only)
}

// Start sends READY=1 together with the first STATUS= line, then runs a
// goroutine that refreshes the status every Options.Interval and, if
// systemd set WATCHDOG_USEC for this process, sends WATCHDOG=1 at half that
// interval. When ctx ends (the service got SIGTERM) it sends STOPPING=1.
// Call Stop before exiting.
func Start(ctx context.Context, o Options) *Notifier {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(ctx)
	n := &Notifier{opts: o, cancel: cancel, done: make(chan struct{})}
	n.watchdog, _ = daemon.SdWatchdogEnabled(false)
	state := daemon.SdNotifyReady
	if line := n.status(); line != "" {
		state += "\nSTATUS=" + line
	}
	n.send(state)
	go n.loop(ctx)
	return n
}

// loop refreshes the status and pings the watchdog until ctx ends, then
// sends STOPPING=1.
func (n *Notifier) loop(ctx context.Context) {
	defer close(n.done)
	status := time.NewTicker(n.opts.Interval)
	defer status.Stop()
	var ping <-chan time.Time
	if n.watchdog > 0 {
		t := time.NewTicker(n.watchdog / 2)
		defer t.Stop()
		ping = t.C
	}
	for {
		select {
		case <-ctx.Done():
			n.stopping()
			return
		case <-status.C:
			if line := n.status(); line != "" {
				n.send("STATUS=" + line)
			}
		case <-ping:
			n.send(daemon.SdNotifyWatchdog)
		}
	}
}

// status returns the current status line if it differs from the last one
// sent, else "".
func (n *Notifier) status() string {
	if n.opts.Status == nil {
		return ""
	}
	line := n.opts.Status()
	if line == n.last {
		return ""
	}
	n.last = line
	return line
}

// Stop ends the notifier: it sends STOPPING=1 unless that was sent already
// and waits for the goroutine to end. ctx passed to Start need not have
// ended.
func (n *Notifier) Stop() {
	n.cancel()
	<-n.done
}

// stopping sends STOPPING=1 once.
func (n *Notifier) stopping() {
	n.stopOnce.Do(func() { n.send(daemon.SdNotifyStopping + "\nSTATUS=stopping") })
}

// send writes one datagram; a failure is logged once (systemd reads the
// socket as long as the service runs, so it means a misconfiguration).
func (n *Notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.warnOnce.Do(func() {
			n.opts.Logger.Warn("cannot notify systemd (NOTIFY_SOCKET)", "err", err)
		})
	}
}
