package httpapi

import (
	"net"
	"sync"
	"time"
)

// Log throttling: a client that keeps sending requests the handler
// refuses (a wrong token, uploads beyond the bound) must not be able to
// flood the log. One line per source address and kind gets through per
// throttleInterval; the next line that does reports how many were
// suppressed in between.
const (
	throttleInterval = time.Minute
	// throttleSources bounds the addresses remembered; beyond it, the
	// addresses not seen for throttleInterval are forgotten, and if that
	// is not enough all new ones share one entry.
	throttleSources = 1024
)

// logThrottle decides which of a repeated log line gets written. It is
// safe for concurrent use.
type logThrottle struct {
	now func() time.Time

	mu      sync.Mutex
	entries map[throttleKey]*throttleEntry
}

// throttleKey is what one throttled line is about: the kind of line and
// the source address ("" for the shared overflow entry).
type throttleKey struct{ kind, source string }

type throttleEntry struct {
	last       time.Time
	suppressed int
}

func newLogThrottle(now func() time.Time) *logThrottle {
	return &logThrottle{now: now, entries: make(map[throttleKey]*throttleEntry)}
}

// allow reports whether the line of the given kind from remoteAddr
// (host:port) may be logged now, and how many such lines were suppressed
// since the last one that was.
func (l *logThrottle) allow(kind, remoteAddr string) (ok bool, suppressed int) {
	key := throttleKey{kind, sourceOf(remoteAddr)}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.entries[key]
	if e == nil {
		if len(l.entries) >= throttleSources {
			l.pruneLocked(now)
		}
		if len(l.entries) >= throttleSources {
			key.source = ""
			e = l.entries[key]
		}
		if e == nil {
			e = &throttleEntry{}
			l.entries[key] = e
		}
	}
	if !e.last.IsZero() && now.Sub(e.last) < throttleInterval {
		e.suppressed++
		return false, 0
	}
	e.last = now
	suppressed, e.suppressed = e.suppressed, 0
	return true, suppressed
}

// pruneLocked forgets the sources whose last line is older than the
// interval (their next line is logged anyway).
func (l *logThrottle) pruneLocked(now time.Time) {
	for k, e := range l.entries {
		if now.Sub(e.last) >= throttleInterval {
			delete(l.entries, k)
		}
	}
}

// sourceOf returns the host part of a remote address.
func sourceOf(remoteAddr string) string {
	if host, _, err := net.SplitHostPort(remoteAddr); err == nil {
		return host
	}
	return remoteAddr
}
