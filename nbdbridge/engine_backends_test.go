package nbdbridge

// Instrumented backends for the engine tests.

import (
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// engTestSlow wraps a MemoryBackend (keeping Trimmer and ZeroWriter) and
// delays every call by a random time up to maxDelay, so that replies
// complete out of order.
type engTestSlow struct {
	m        *MemoryBackend
	maxDelay time.Duration
}

func (s *engTestSlow) sleep() {
	if s.maxDelay > 0 {
		time.Sleep(rand.N(s.maxDelay))
	}
}
func (s *engTestSlow) ReadAt(p []byte, off int64) (int, error) { s.sleep(); return s.m.ReadAt(p, off) }
func (s *engTestSlow) WriteAt(p []byte, off int64) (int, error) {
	s.sleep()
	return s.m.WriteAt(p, off)
}
func (s *engTestSlow) Size() int64                  { return s.m.Size() }
func (s *engTestSlow) Flush() error                 { s.sleep(); return s.m.Flush() }
func (s *engTestSlow) Trim(off, length int64) error { s.sleep(); return s.m.Trim(off, length) }
func (s *engTestSlow) WriteZeroes(off, n int64, h bool) error {
	s.sleep()
	return s.m.WriteZeroes(off, n, h)
}

// engTestPlain exposes only the Backend methods of b (no optional
// interfaces), to test the engine's fallbacks. It counts calls.
type engTestPlain struct {
	b       Backend
	writes  atomic.Int64
	flushes atomic.Int64
}

func (p *engTestPlain) ReadAt(b []byte, off int64) (int, error) { return p.b.ReadAt(b, off) }
func (p *engTestPlain) WriteAt(b []byte, off int64) (int, error) {
	p.writes.Add(1)
	return p.b.WriteAt(b, off)
}
func (p *engTestPlain) Size() int64  { return p.b.Size() }
func (p *engTestPlain) Flush() error { p.flushes.Add(1); return p.b.Flush() }

// engTestFail fails requests touching [badOff, badOff+badLen) with err.
type engTestFail struct {
	*MemoryBackend
	badOff, badLen int64
	err            error
	flushErr       error
}

func (f *engTestFail) hits(off, n int64) bool { return off < f.badOff+f.badLen && f.badOff < off+n }
func (f *engTestFail) ReadAt(p []byte, off int64) (int, error) {
	if f.hits(off, int64(len(p))) {
		return 0, f.err
	}
	return f.MemoryBackend.ReadAt(p, off)
}
func (f *engTestFail) WriteAt(p []byte, off int64) (int, error) {
	if f.hits(off, int64(len(p))) {
		return 0, f.err
	}
	return f.MemoryBackend.WriteAt(p, off)
}
func (f *engTestFail) Flush() error {
	if f.flushErr != nil {
		return f.flushErr
	}
	return f.MemoryBackend.Flush()
}

// engTestShort returns short reads without an error.
type engTestShort struct{ *MemoryBackend }

func (s engTestShort) ReadAt(p []byte, off int64) (int, error) {
	n, err := s.MemoryBackend.ReadAt(p[:len(p)/2], off)
	return n, err
}

// engTestRecorder logs, in order, when each write completed and when
// Flush started, to check the FLUSH ordering rule. Writes carry their id
// in the first 8 bytes of the payload.
type engTestRecorder struct {
	m        *MemoryBackend
	maxDelay time.Duration

	mu     sync.Mutex
	events []engTestEvent
}

type engTestEvent struct {
	flush bool
	id    uint64 // write id
}

func (r *engTestRecorder) ReadAt(p []byte, off int64) (int, error) { return r.m.ReadAt(p, off) }
func (r *engTestRecorder) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(rand.N(r.maxDelay))
	n, err := r.m.WriteAt(p, off)
	var id uint64
	for i := range 8 {
		id = id<<8 | uint64(p[i])
	}
	r.mu.Lock()
	r.events = append(r.events, engTestEvent{id: id})
	r.mu.Unlock()
	return n, err
}
func (r *engTestRecorder) Size() int64 { return r.m.Size() }
func (r *engTestRecorder) Flush() error {
	r.mu.Lock()
	r.events = append(r.events, engTestEvent{flush: true})
	r.mu.Unlock()
	return nil
}

// engTestGate blocks reads until released, to hold requests in flight.
type engTestGate struct {
	*MemoryBackend
	gate    chan struct{}
	started atomic.Int64
}

func (g *engTestGate) ReadAt(p []byte, off int64) (int, error) {
	g.started.Add(1)
	<-g.gate
	return g.MemoryBackend.ReadAt(p, off)
}

// engTestFUA counts WriteAtFUA calls besides MemoryBackend's behaviour.
type engTestFUA struct {
	*MemoryBackend
	fuaWrites atomic.Int64
}

func (f *engTestFUA) WriteAtFUA(p []byte, off int64) (int, error) {
	f.fuaWrites.Add(1)
	return f.MemoryBackend.WriteAt(p, off)
}

// engTestAsync adds AsyncReader to engTestSlow: started reads are held
// until SendStarted, then each completes on its own goroutine after a
// random delay (out of order), like the DNBD3 client library's.
type engTestAsync struct {
	*engTestSlow
	mu      sync.Mutex
	held    []func()
	started atomic.Int64
	sends   atomic.Int64
}

func (a *engTestAsync) StartRead(p []byte, off int64, t ReadTarget) {
	a.started.Add(1)
	a.mu.Lock()
	a.held = append(a.held, func() {
		n, err := a.ReadAt(p, off) // sleeps a random time
		if err == nil && n < len(p) {
			err = errShortAsync
		}
		t.ReadDone(err)
	})
	a.mu.Unlock()
}

func (a *engTestAsync) SendStarted() {
	a.sends.Add(1)
	a.mu.Lock()
	held := a.held
	a.held = nil
	a.mu.Unlock()
	for _, f := range held {
		go f()
	}
}

var errShortAsync = errors.New("short asynchronous read")
