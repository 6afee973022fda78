package merger

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Tests of the bounds on what clients can make the Manager hold
// (issue 10 item 12): sessions, open files, bytes per session, and what
// a create that fails leaves behind.

// TestSessionLimits: creates beyond MaxSessions or MaxSessionsPerImage
// are refused with back-pressure and leave nothing behind; deleted
// sessions free their places; a restart counts the sessions it loads.
func TestSessionLimits(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxSessions = 3
	e.cfg.MaxSessionsPerImage = 2
	for _, n := range []string{"a", "b", "pool/c"} {
		e.original(n, 1, make([]byte, cowformat.ClusterSize))
	}
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	m := e.manager(func(m *Manager) { m.now = now })
	refused := func(name, why string) {
		t.Helper()
		var bp *BackPressureError
		if _, err := m.Create(name, 1, cowformat.BitfieldSize); !errors.As(err, &bp) || !strings.Contains(bp.Reason, why) || bp.RetryAfter <= 0 {
			t.Fatalf("create of %s: %v, want back-pressure mentioning %q", name, err, why)
		}
	}
	a1, err := m.Create("a", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("a", 1, cowformat.BitfieldSize); err != nil {
		t.Fatal(err)
	}
	refused("a", "per image")
	if _, err := m.Create("b", 1, cowformat.BitfieldSize); err != nil {
		t.Fatal(err)
	}
	refused("pool/c", "3 sessions")
	if entries, _ := os.ReadDir(e.work); len(entries) != 4 { // .lock and 3 sessions
		t.Fatalf("%d entries in the working directory, want .lock and 3 sessions", len(entries))
	}
	// A restart counts what it loads (with room for one more overall).
	m.Close()
	e.cfg.MaxSessions = 4
	m = e.manager(func(m *Manager) { m.now = now })
	refused("a", "per image")
	// Sessions that never got an upload are deleted after
	// AbandonEmptyAfter (default 1 h), freeing their places.
	if err := m.Update(a1.UUID, Update{Cluster: 1}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	clock = clock.Add(61 * time.Minute)
	mu.Unlock()
	m.sweep()
	if _, err := m.Status(a1.UUID); err != nil {
		t.Fatalf("session with an upload deleted: %v", err)
	}
	if len(m.allSessions()) != 1 {
		t.Fatalf("%d sessions after the sweep, want 1", len(m.allSessions()))
	}
	for _, n := range []string{"a", "pool/c", "b"} {
		if _, err := m.Create(n, 1, cowformat.BitfieldSize); err != nil {
			t.Fatalf("create of %s after the sweep: %v", n, err)
		}
	}
	refused("b", "4 sessions")
}

// TestAbandonEmptySessions: an Active session without any upload goes
// after AbandonEmptyAfter, one with uploads only after AbandonAfter,
// also across a restart.
func TestAbandonEmptySessions(t *testing.T) {
	e := newEnv(t)
	e.cfg.AbandonAfter = 10 * time.Hour
	e.cfg.AbandonEmptyAfter = 30 * time.Minute
	e.original("x", 1, make([]byte, cowformat.ClusterSize))
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	m := e.manager(func(m *Manager) { m.now = now })
	empty, _ := m.Create("x", 1, cowformat.BitfieldSize)
	used, _ := m.Create("x", 1, cowformat.BitfieldSize)
	mustUpdate(t, m, used.UUID, &upload{cluster: 0}, false)
	empty2, _ := m.Create("x", 1, cowformat.BitfieldSize)
	// Across a restart: the journal tells an empty session from a used one.
	m.Close()
	m = e.manager(func(m *Manager) { m.now = now })
	advance(29 * time.Minute)
	m.sweep()
	if len(m.allSessions()) != 3 {
		t.Fatalf("%d sessions after 29 min, want 3", len(m.allSessions()))
	}
	advance(2 * time.Minute)
	m.sweep()
	for _, c := range []struct {
		id   string
		kept bool
	}{{empty.UUID, false}, {empty2.UUID, false}, {used.UUID, true}} {
		_, err := m.Status(c.id)
		_, serr := os.Stat(filepath.Join(e.work, c.id))
		if (err == nil) != c.kept || (serr == nil) != c.kept {
			t.Errorf("session %s: status %v, directory %v, want kept=%v", c.id, err, serr, c.kept)
		}
	}
}

// TestOpenSessionsBounded: at most MaxOpenSessions stores are open; idle
// ones are closed (and reopened with their uploads intact) to make room,
// and when every open one is in use, an upload gets back-pressure.
func TestOpenSessionsBounded(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxOpenSessions = 2
	rng := rand.New(rand.NewPCG(51, 52))
	e.original("o", 1, make([]byte, 4*cowformat.ClusterSize))
	m := e.manager(nil)
	fdsBefore := openFDs(t)
	var ids []string
	want := make(map[string]*upload)
	for range 8 {
		info, err := m.Create("o", 1, cowformat.BitfieldSize)
		if err != nil {
			t.Fatal(err)
		}
		u := randomUpload(rng, 1, 0.3)
		mustUpdate(t, m, info.UUID, u, false)
		ids = append(ids, info.UUID)
		want[info.UUID] = u
		if m.openCount > 2 {
			t.Fatalf("%d stores open, want at most 2", m.openCount)
		}
	}
	if n := openFDs(t) - fdsBefore; n > 4 {
		t.Errorf("%d more descriptors open with 8 sessions, want at most 4 (2 stores)", n)
	}
	for _, id := range ids {
		checkStored(t, m, id, map[int]*upload{1: want[id]})
		if st, err := m.Status(id); err != nil || st.TotalClusters != 1 {
			t.Fatalf("status of %s: %+v %v", id, st, err)
		}
	}
	// Both open stores busy (their sessions held, as by a request in
	// progress): an upload to a third session must wait its turn.
	var held []*session
	for e := m.openLRU.Front(); e != nil; e = e.Next() {
		held = append(held, e.Value.(*session))
	}
	if len(held) != 2 {
		t.Fatalf("%d stores in the LRU", len(held))
	}
	for _, s := range held {
		s.mu.Lock()
	}
	var other string
	for _, id := range ids {
		if s, _ := m.lookup(id); s != held[0] && s != held[1] {
			other = id
		}
	}
	var bp *BackPressureError
	err := m.Update(other, randomUpload(rng, 2, 0.1).update(false))
	for _, s := range held {
		s.mu.Unlock()
	}
	if !errors.As(err, &bp) || !strings.Contains(bp.Reason, "in use") {
		t.Fatalf("upload while every open session is busy: %v", err)
	}
	mustUpdate(t, m, other, randomUpload(rng, 2, 0.1), false)
}

// openFDs returns the number of descriptors the test process has open.
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("SKIP: /proc/self/fd is not readable: %v", err)
	}
	return len(entries)
}

// TestSessionQuota: a session holds at most SessionQuota/ClusterSize
// distinct clusters; re-uploads of stored ones still pass. The automatic
// quota is twice the original, at least MinAutoQuota.
func TestSessionQuota(t *testing.T) {
	e := newEnv(t)
	e.cfg.SessionQuota = 2*cowformat.ClusterSize + 1 // three clusters
	rng := rand.New(rand.NewPCG(53, 54))
	e.original("q", 1, make([]byte, cowformat.ClusterSize))
	m := e.manager(nil)
	info, _ := m.Create("q", 1, cowformat.BitfieldSize)
	for c := range 3 {
		mustUpdate(t, m, info.UUID, randomUpload(rng, c, 0.5), false)
	}
	if err := m.Update(info.UUID, randomUpload(rng, 7, 0.01).update(false)); !errors.Is(err, ErrQuotaExceeded) {
		t.Fatalf("fourth cluster: %v, want ErrQuotaExceeded", err)
	}
	last := randomUpload(rng, 1, 1)
	mustUpdate(t, m, info.UUID, last, true)
	st, err := os.Stat(filepath.Join(e.work, info.UUID, dataFileName))
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 4*cowformat.ClusterSize {
		t.Errorf("data file of %d bytes for a 3-cluster quota, want at most 4 clusters (3 + 1 replaced)", st.Size())
	}
	// After a restart the quota still holds.
	m.Close()
	m = e.manager(nil)
	if err := m.Update(info.UUID, Update{Cluster: 9}); !errors.Is(err, ErrQuotaExceeded) {
		t.Fatalf("new cluster after restart: %v, want ErrQuotaExceeded", err)
	}

	// Automatic quota.
	s, _ := m.lookup(info.UUID)
	m.cfg.SessionQuota = 0
	for _, c := range []struct {
		size int64
		want int
	}{
		{cowformat.ClusterSize, int((MinAutoQuota + cowformat.ClusterSize - 1) / cowformat.ClusterSize)},
		{1000 * cowformat.ClusterSize, 2000},
		{1000*cowformat.ClusterSize + 1, 2002},
		{MaxImageSize, cowformat.MaxClusters},
	} {
		s.meta.OriginalSize = c.size
		if got := m.maxClusters(s); got != c.want {
			t.Errorf("original of %d bytes: quota of %d clusters, want %d", c.size, got, c.want)
		}
	}
}

// TestOutOfDescriptors: when the process has no descriptor left, a
// create and an upload are refused with back-pressure (not an internal
// error), and the create leaves no directory behind.
func TestOutOfDescriptors(t *testing.T) {
	e := newEnv(t)
	e.original("fd", 1, make([]byte, cowformat.ClusterSize))
	m := e.manager(nil)
	info, err := m.Create("fd", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	var bp *BackPressureError
	exhaustDescriptors(t, func() {
		if _, err := m.Create("fd", 1, cowformat.BitfieldSize); !errors.As(err, &bp) || !strings.Contains(bp.Reason, "too many files") {
			t.Errorf("create without descriptors: %v, want back-pressure", err)
		}
		if err := m.Update(info.UUID, Update{Cluster: 1}); !errors.As(err, &bp) || !strings.Contains(bp.Reason, "too many files") {
			t.Errorf("upload without descriptors: %v, want back-pressure", err)
		}
	})
	entries, _ := os.ReadDir(e.work)
	if len(entries) != 2 {
		var names []string
		for _, d := range entries {
			names = append(names, d.Name())
		}
		t.Errorf("working directory holds %v, want .lock and one session", names)
	}
	if len(m.allSessions()) != 1 {
		t.Errorf("%d sessions, want 1", len(m.allSessions()))
	}
	// Everything works again once descriptors are free.
	if _, err := m.Create("fd", 1, cowformat.BitfieldSize); err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, m, info.UUID, &upload{cluster: 1}, false)
}

// exhaustDescriptors runs fn while the process cannot open another file:
// it lowers the soft RLIMIT_NOFILE and fills every free descriptor
// number below it, then restores both.
func exhaustDescriptors(t *testing.T, fn func()) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = uint64(openFDs(t) + 16)
	if lim.Cur > old.Cur {
		t.Skipf("SKIP: descriptor limit %d is too low to lower it", old.Cur)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("SKIP: cannot lower RLIMIT_NOFILE: %v", err)
	}
	var fill []*os.File
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatalf("filling descriptors: %v", err)
			}
			break
		}
		fill = append(fill, f)
	}
	func() {
		defer func() {
			for _, f := range fill {
				f.Close()
			}
			if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
				t.Fatal(err)
			}
		}()
		fn()
	}()
}

// TestMergePausedWhenOutOfFiles: a merge that runs out of file
// descriptors is not marked Failed but tried again, and completes.
func TestMergePausedWhenOutOfFiles(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(55, 56))
	original := randBytes(rng, 2*cowformat.ClusterSize)
	e.original("p", 1, original)
	var mu sync.Mutex
	fails := 2
	m := e.manager(func(m *Manager) {
		m.mergeRetry = 10 * time.Millisecond
		m.hook = func(point, _ string) error {
			mu.Lock()
			defer mu.Unlock()
			if point == hookCopied && fails > 0 {
				fails--
				return &os.PathError{Op: "open", Path: "x", Err: syscall.EMFILE}
			}
			return nil
		}
	})
	info, _ := m.Create("p", 1, cowformat.BitfieldSize)
	u := randomUpload(rng, 1, 0.5)
	mustUpdate(t, m, info.UUID, u, false)
	mergeDone(t, m, info.UUID, 2*cowformat.ClusterSize, 2*cowformat.ClusterSize)
	sameBytes(t, "p.r2", e.destFile("p.r2"), expectedImage(original, []*upload{u}, 2*cowformat.ClusterSize, 2*cowformat.ClusterSize))
	if fails != 0 {
		t.Fatalf("the simulated failure happened %d times, want 2", 2-fails)
	}
	e.noTempFiles()
}

// TestOpenSessionsConcurrent: uploads, status and statistics requests
// to more sessions than may be open, all at once: stores are closed and
// reopened under load, no upload is lost, and busy stores only ever
// cause back-pressure.
func TestOpenSessionsConcurrent(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxOpenSessions = 2
	e.original("c", 1, make([]byte, 8*cowformat.ClusterSize))
	m := e.manager(nil)
	const sessions, rounds = 6, 12
	ids := make([]string, sessions)
	for i := range ids {
		info, err := m.Create("c", 1, cowformat.BitfieldSize)
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = info.UUID
	}
	var wg sync.WaitGroup
	latest := make([]map[int]*upload, sessions)
	errs := make(chan error, sessions*rounds*3)
	for i, id := range ids {
		latest[i] = make(map[int]*upload)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 57))
			for r := range rounds {
				u := randomUpload(rng, r%4, 0.05)
				for {
					err := m.Update(id, u.update(r%2 == 0))
					var bp *BackPressureError
					if errors.As(err, &bp) {
						time.Sleep(time.Millisecond)
						continue
					}
					if err != nil {
						errs <- err
					}
					break
				}
				latest[i][u.cluster] = u
				if _, err := m.Status(id); err != nil {
					errs <- err
				}
				var bp *BackPressureError
				if _, err := m.TopModified(id, 3); err != nil && !errors.As(err, &bp) {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, id := range ids {
		checkStored(t, m, id, latest[i])
	}
	m.openMu.Lock()
	n := m.openCount
	m.openMu.Unlock()
	if n > 2 {
		t.Errorf("%d stores open, want at most 2", n)
	}
}
