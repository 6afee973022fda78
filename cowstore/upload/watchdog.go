package upload

import (
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// watchdog calls fire once no progress has been reported for d. It guards
// a request against a merger that stops reading or answering, like curl's
// low-speed limit in the reference client. A nil watchdog does nothing.
type watchdog struct {
	d     time.Duration
	fire  func()
	start time.Time
	last  atomic.Int64 // nanoseconds since start of the last progress

	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

// newWatchdog arms a watchdog; it returns nil if d <= 0.
func newWatchdog(d time.Duration, fire func()) *watchdog {
	if d <= 0 {
		return nil
	}
	w := &watchdog{d: d, fire: fire, start: time.Now()}
	w.mu.Lock()
	w.t = time.AfterFunc(d, w.check)
	w.mu.Unlock()
	return w
}

// touch records progress.
func (w *watchdog) touch() {
	if w != nil {
		w.last.Store(int64(time.Since(w.start)))
	}
}

// check runs when the timer expires: it fires if the request has been idle
// for d, and otherwise re-arms for the rest of the period.
func (w *watchdog) check() {
	idle := time.Since(w.start) - time.Duration(w.last.Load())
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if idle >= w.d {
		w.stopped = true
		w.fire()
		return
	}
	w.t.Reset(w.d - idle)
}

// stop disarms the watchdog.
func (w *watchdog) stop() {
	if w == nil {
		return
	}
	w.mu.Lock()
	w.stopped = true
	w.t.Stop()
	w.mu.Unlock()
}

// progressReader reports every successful read to a watchdog.
type progressReader struct {
	r io.Reader
	w *watchdog
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.w.touch()
	}
	return n, err
}
