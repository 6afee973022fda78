package upload

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// fakeCluster is one cluster of the fake overlay.
type fakeCluster struct {
	bits    [cowformat.BitfieldSize]byte
	blocks  map[int][]byte
	changed int64 // 0 = clean
	gen     uint64
	uploads int
	fails   int
}

// fakeSource is an in-memory overlay implementing Source.
type fakeSource struct {
	clock *fakeClock

	mu          sync.Mutex
	clusters    map[int]*fakeCluster
	uuid        string
	image       string
	rid         uint16
	valid, size int64
	snapErr     map[int]error
	setUUIDErr  error
}

func newFakeSource(clock *fakeClock) *fakeSource {
	return &fakeSource{
		clock:    clock,
		clusters: make(map[int]*fakeCluster),
		image:    "pool/img",
		rid:      3,
		valid:    8 * cowformat.ClusterSize,
		size:     8 * cowformat.ClusterSize,
	}
}

// write stores block `block` of cluster idx filled with fill and marks
// the cluster dirty now.
func (f *fakeSource) write(idx, block int, fill byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.clusters[idx]
	if c == nil {
		c = &fakeCluster{blocks: make(map[int][]byte)}
		f.clusters[idx] = c
	}
	c.bits[block/8] |= 1 << (block % 8)
	b := make([]byte, cowformat.BlockSize)
	for i := range b {
		b[i] = fill + byte(i%7)
	}
	c.blocks[block] = b
	c.gen++
	c.changed = f.clock.Now().Unix()
}

// markClean pretends the cluster was uploaded before.
func (f *fakeSource) markClean(idx int) {
	f.mu.Lock()
	f.clusters[idx].changed = 0
	f.mu.Unlock()
}

func (f *fakeSource) cluster(idx int) fakeCluster {
	f.mu.Lock()
	defer f.mu.Unlock()
	return *f.clusters[idx]
}

func (f *fakeSource) dirty(idx int) bool { return f.cluster(idx).changed != 0 }

// view is what the overlay shows: original up to validRemoteSize, zeroes
// after it, local blocks on top, size bytes.
func (f *fakeSource) view(original []byte) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	img := make([]byte, f.size)
	copy(img, original[:min(int64(len(original)), f.valid, f.size)])
	for idx, c := range f.clusters {
		for b, data := range c.blocks {
			off := int64(idx)*cowformat.ClusterSize + int64(b)*cowformat.BlockSize
			if off < f.size {
				copy(img[off:], data)
			}
		}
	}
	return img
}

func (f *fakeSource) DirtyClusters(fn func(index int, changed int64)) {
	f.mu.Lock()
	type d struct {
		i int
		c int64
	}
	var ds []d
	for i, c := range f.clusters {
		if c.changed != 0 {
			ds = append(ds, d{i, c.changed})
		}
	}
	f.mu.Unlock()
	slices.SortFunc(ds, func(a, b d) int { return a.i - b.i })
	for _, x := range ds {
		fn(x.i, x.c)
	}
}

func (f *fakeSource) Counts() (dirty, clean int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.clusters {
		if c.changed != 0 {
			dirty++
		} else {
			clean++
		}
	}
	return dirty, clean
}

func (f *fakeSource) Snapshot(index int) ([cowformat.BitfieldSize]byte, []byte, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.clusters[index]
	if c == nil {
		return [cowformat.BitfieldSize]byte{}, nil, 0, errors.New("no such cluster")
	}
	if err := f.snapErr[index]; err != nil {
		return [cowformat.BitfieldSize]byte{}, nil, c.gen, err
	}
	var blocks []byte
	for b := range cowformat.BitfieldSize * 8 {
		if c.bits[b/8]&(1<<(b%8)) != 0 {
			blocks = append(blocks, c.blocks[b]...)
		}
	}
	return c.bits, blocks, c.gen, nil
}

func (f *fakeSource) MarkUploaded(index int, gen uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.clusters[index]
	c.uploads++
	c.fails = 0
	if c.gen != gen {
		return false
	}
	c.changed = 0
	return true
}

func (f *fakeSource) MarkFailed(index int, gen uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.clusters[index]
	c.fails++
	if c.gen == gen && c.changed != 0 {
		c.changed = f.clock.Now().Unix()
	}
}

func (f *fakeSource) UUID() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.uuid
}

func (f *fakeSource) SetUUID(uuid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.setUUIDErr != nil {
		return f.setUUIDErr
	}
	f.uuid = uuid
	return nil
}

func (f *fakeSource) ImageName() string      { return f.image }
func (f *fakeSource) RID() uint16            { return f.rid }
func (f *fakeSource) ValidRemoteSize() int64 { f.mu.Lock(); defer f.mu.Unlock(); return f.valid }
func (f *fakeSource) Size() int64            { f.mu.Lock(); defer f.mu.Unlock(); return f.size }

var _ Source = (*fakeSource)(nil)

// env is a test setup: fake clock, fake overlay, fake merger, uploader.
type env struct {
	clock *fakeClock
	src   *fakeSource
	srv   *mergertest.Server
	m     *MergerClient
	cfg   Config
}

// newEnv builds an environment with fast test timings; change cfg before
// calling uploader.
func newEnv(t *testing.T) *env {
	t.Helper()
	checkNoLeaks(t)
	clock := newClock()
	e := &env{clock: clock, src: newFakeSource(clock), srv: mergertest.Start(t)}
	e.m = newTestMerger(t, e.srv.Addr, MergerConfig{})
	e.cfg = Config{
		MinDelay:          60 * time.Second,
		PassInterval:      5 * time.Millisecond,
		StatsInterval:     time.Hour,
		Logger:            slog.New(slog.DiscardHandler),
		Now:               clock.Now,
		BackPressureDelay: 50 * time.Millisecond,
		RetryBackoff:      5 * time.Millisecond,
		MaxBackoff:        20 * time.Millisecond,
	}
	return e
}

func (e *env) uploader() *Uploader { return New(e.src, e.m, e.cfg) }

// session creates a merger session and stores it in the overlay.
func (e *env) session(t *testing.T) string {
	t.Helper()
	e.srv.NextUUIDs(fixtureUUID)
	id, err := New(e.src, e.m, e.cfg).EnsureSession(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// runBG starts Run and returns a function that stops it and checks that
// it returned nil.
func runBG(t *testing.T, u *Uploader) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- u.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// checkNoLeaks fails the test if goroutines of this package are still
// running when the test (and its other cleanups) end.
func checkNoLeaks(t *testing.T) {
	t.Cleanup(func() {
		deadline := time.Now().Add(3 * time.Second)
		for {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			var leaked []string
			for _, g := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(g, "cowstore/upload.(*Uploader)") || strings.Contains(g, "cowstore/upload.(*watchdog)") {
					leaked = append(leaked, g)
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutine(s) leaked:\n%s", len(leaked), strings.Join(leaked, "\n\n"))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}
