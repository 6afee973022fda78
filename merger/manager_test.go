package merger

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/uuid"
)

func TestNewManagerConfig(t *testing.T) {
	e := newEnv(t)
	for _, bad := range []func(*Config){
		func(c *Config) { c.WorkingDirectory = "" },
		func(c *Config) { c.OriginalImageDirectory = filepath.Join(e.orig, "missing") },
		func(c *Config) { c.DestinationDirectory = filepath.Join(e.dest, "missing") },
		func(c *Config) { c.CopyMethod = "magic" },
	} {
		cfg := e.cfg
		bad(&cfg)
		if _, err := NewManager(cfg); err == nil {
			t.Errorf("NewManager accepted %+v", cfg)
		}
	}
	os.WriteFile(filepath.Join(e.work, "file"), nil, 0o644)
	cfg := e.cfg
	cfg.DestinationDirectory = filepath.Join(e.work, "file")
	if _, err := NewManager(cfg); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("a file as DestinationDirectory: %v", err)
	}
	m, err := NewManager(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewManager(e.cfg); err == nil || !strings.Contains(err.Error(), "in use by another merger") {
		t.Fatalf("two Managers on one WorkingDirectory: %v", err)
	}
	defer m.Close()
	if m.cfg.Retention != DefaultRetention || m.cfg.AbandonAfter != DefaultAbandonAfter ||
		m.cfg.MaxConcurrentMerges != DefaultMaxConcurrentMerges || m.cfg.SweepInterval != 6*time.Minute ||
		m.cfg.AbandonEmptyAfter != DefaultAbandonEmptyAfter || m.cfg.MaxSessions != DefaultMaxSessions ||
		m.cfg.MaxSessionsPerImage != DefaultMaxSessionsPerImage || m.cfg.MaxOpenSessions != DefaultMaxOpenSessions {
		t.Fatalf("defaults: %+v", m.cfg)
	}
}

func TestValidation(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(41, 42))
	original := randBytes(rng, 2*cowformat.ClusterSize+10)
	e.original("good", 1, original)
	e.original("x", 1, original)
	e.original("pool/img", 1, original)
	os.MkdirAll(filepath.Join(e.orig, "dir.r1"), 0o755)
	m := e.manager(nil)

	for _, name := range []string{"../x", "/abs", "a/../b", ".hidden", "a/.b", "a/./b", "", "trailing/", "nul\x00x",
		"pool//img", "pool///img", "./good", "a//b/c", "good//"} {
		if _, err := m.Create(name, 1, cowformat.BitfieldSize); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Create(%q): %v, want ErrInvalidName", name, err)
		}
	}
	for _, bfs := range []int{0, 320, 39, 41, -40} {
		if _, err := m.Create("good", 1, bfs); !errors.Is(err, ErrBadRequest) {
			t.Errorf("bitfieldSize %d: %v", bfs, err)
		}
	}
	for _, rev := range []int{0, -1, 65535, 70000} {
		if _, err := m.Create("good", rev, cowformat.BitfieldSize); !errors.Is(err, ErrBadRequest) {
			t.Errorf("revision %d: %v", rev, err)
		}
	}
	for _, c := range []struct {
		name string
		rev  int
	}{{"good", 2}, {"missing", 1}, {"dir", 1}, {"good.r1/x", 1}} {
		if _, err := m.Create(c.name, c.rev, cowformat.BitfieldSize); !errors.Is(err, ErrImageNotFound) {
			t.Errorf("Create(%q, %d): %v, want ErrImageNotFound", c.name, c.rev, err)
		}
	}
	if entries, _ := os.ReadDir(e.work); len(entries) != 1 || entries[0].Name() != lockFileName {
		t.Fatalf("rejected creates left entries in the working directory: %v", entries)
	}

	info, err := m.Create("good", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	if info.BitfieldSize != cowformat.BitfieldSize || info.ImageName != "good" {
		t.Fatalf("%+v", info)
	}
	var bf [cowformat.BitfieldSize]byte
	bf[0] = 0b101 // 2 blocks
	for _, u := range []Update{
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, cowformat.BlockSize)},
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, 3*cowformat.BlockSize)},
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize+1)},
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, cowformat.ClusterSize)}, // full-sized but not marked Full
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize), Full: true},
		{Cluster: 0, Bitfield: bf, Blocks: make([]byte, cowformat.ClusterSize-1), Full: true},
		{Cluster: 0, Blocks: make([]byte, cowformat.BlockSize)},
		{Cluster: -1, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize)},
		{Cluster: cowformat.MaxClusters, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize)},
		{Cluster: 1 << 40, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize)},
	} {
		if err := m.Update(info.UUID, u); !errors.Is(err, ErrBadRequest) {
			t.Errorf("Update(cluster %d, %d bytes, full %v): %v, want ErrBadRequest", u.Cluster, len(u.Blocks), u.Full, err)
		}
	}
	// Valid edge cases: the last cluster, an empty bitfield, the id in
	// other spellings.
	if err := m.Update(info.UUID, Update{Cluster: cowformat.MaxClusters - 1, Bitfield: bf, Blocks: make([]byte, 2*cowformat.BlockSize)}); err != nil {
		t.Fatal(err)
	}
	if err := m.Update(info.UUID, Update{Cluster: cowformat.MaxClusters - 1}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{strings.ToUpper(info.UUID), "{" + info.UUID + "}", strings.ReplaceAll(info.UUID, "-", "")} {
		if _, err := m.Status(id); err != nil {
			t.Errorf("Status(%q): %v", id, err)
		}
	}
	for _, id := range []string{"", "../../etc/passwd", "00000000-0000-4000-8000-000000000000", info.UUID + "x", info.UUID[:35] + "g"} {
		if err := m.Update(id, Update{}); !errors.Is(err, ErrSessionNotFound) {
			t.Errorf("Update(%q): %v, want ErrSessionNotFound", id, err)
		}
		if _, err := m.Status(id); !errors.Is(err, ErrSessionNotFound) {
			t.Errorf("Status(%q): %v", id, err)
		}
		if _, err := m.Merge(id, 0, 0); !errors.Is(err, ErrSessionNotFound) {
			t.Errorf("Merge(%q): %v", id, err)
		}
		if _, err := m.TopModified(id, 1); !errors.Is(err, ErrSessionNotFound) {
			t.Errorf("TopModified(%q): %v", id, err)
		}
	}
	if _, err := m.TopModified(info.UUID, -1); !errors.Is(err, ErrBadRequest) {
		t.Errorf("TopModified(-1): %v", err)
	}
	if top, err := m.TopModified(info.UUID, 0); err != nil || len(top) != 0 {
		t.Errorf("TopModified(0): %v, %v", top, err)
	}

	size := int64(len(original))
	for _, sz := range [][2]int64{{-1, 0}, {0, -1}, {roundUp(size, cowformat.BlockSize) + 1, size}, {size, MaxImageSize + 1}} {
		if _, err := m.Merge(info.UUID, sz[0], sz[1]); !errors.Is(err, ErrBadRequest) {
			t.Errorf("Merge(%d, %d): %v, want ErrBadRequest", sz[0], sz[1], err)
		}
	}
	if st, _ := m.Status(info.UUID); st.State != StateActive {
		t.Fatalf("rejected merges changed the state: %+v", st)
	}
	// The 4 KiB-rounded size is the client's view of an unaligned image.
	if _, err := m.Merge(info.UUID, roundUp(size, cowformat.BlockSize), MaxImageSize); err != nil {
		t.Fatal(err)
	}
	if err := m.Update(info.UUID, Update{Cluster: 0}); !errors.Is(err, ErrSessionClosed) {
		t.Errorf("upload after merge: %v, want ErrSessionClosed", err)
	}
	st := waitFinished(t, m, info.UUID)
	if st.State != StateDone {
		t.Fatal(st.Error)
	}
	if err := m.Update(info.UUID, Update{Cluster: 0}); !errors.Is(err, ErrSessionClosed) {
		t.Errorf("upload after done: %v, want ErrSessionClosed", err)
	}
	// A 10^12-byte image, sparse: the original's bytes, then zeros (the
	// last cluster's upload was replaced by an empty one).
	fi, err := os.Stat(filepath.Join(e.dest, "good.r2"))
	if err != nil || fi.Size() != MaxImageSize {
		t.Fatalf("%v, %v", fi, err)
	}
	f, _ := os.Open(filepath.Join(e.dest, "good.r2"))
	defer f.Close()
	head := make([]byte, len(original)+cowformat.BlockSize)
	f.ReadAt(head, 0)
	sameBytes(t, "head", head, append(append([]byte(nil), original...), make([]byte, cowformat.BlockSize)...))
	if a := allocated(t, f.Name()); a > 64<<20 {
		t.Errorf("the sparse 1 TB result allocates %d bytes", a)
	}
}

func TestBackPressureMerges(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxConcurrentMerges = 1
	rng := rand.New(rand.NewPCG(43, 44))
	original := randBytes(rng, 2<<20)
	size := int64(len(original))
	e.original("a", 1, original)
	e.original("b", 1, original)
	release := make(chan struct{})
	var once sync.Once
	m := e.manager(func(m *Manager) {
		m.hook = func(point, _ string) error {
			if point == hookCopied {
				once.Do(func() { <-release })
			}
			return nil
		}
	})
	a, _ := m.Create("a", 1, cowformat.BitfieldSize)
	b, _ := m.Create("b", 1, cowformat.BitfieldSize)
	ub := randomUpload(rng, 0, 0.5)
	if _, err := m.Merge(a.UUID, size, size); err != nil {
		t.Fatal(err)
	}
	_, err := m.Merge(b.UUID, size, size)
	var bp *BackPressureError
	if !errors.As(err, &bp) || bp.RetryAfter <= 0 || bp.RetryAfter > 120*time.Second || !strings.Contains(bp.Reason, "merges") {
		t.Fatalf("second merge with MaxConcurrentMerges 1: %v", err)
	}
	// Nothing changed: b still takes uploads.
	if st, _ := m.Status(b.UUID); st.State != StateActive {
		t.Fatalf("%+v", st)
	}
	mustUpdate(t, m, b.UUID, ub, false)
	close(release)
	waitFinished(t, m, a.UUID)
	mergeDone(t, m, b.UUID, size, size)
	sameBytes(t, "b", e.destFile("b.r2"), expectedImage(original, []*upload{ub}, size, size))
}

func TestBackPressureDiskSpace(t *testing.T) {
	e := newEnv(t)
	e.cfg.MinFreeSpace = 1 << 60
	rng := rand.New(rand.NewPCG(45, 46))
	e.original("full", 1, randBytes(rng, cowformat.ClusterSize))
	m := e.manager(nil)
	var bp *BackPressureError
	if _, err := m.Create("full", 1, cowformat.BitfieldSize); !errors.As(err, &bp) || !strings.Contains(bp.Reason, "free") {
		t.Fatalf("create on a full disk: %v", err)
	}
	if entries, _ := os.ReadDir(e.work); len(entries) != 1 {
		t.Fatalf("the refused create left %d entries", len(entries)-1)
	}
	m.cfg.MinFreeSpace = 0
	info, err := m.Create("full", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	m.cfg.MinFreeSpace = 1 << 60
	if err := m.Update(info.UUID, randomUpload(rng, 0, 0.1).update(false)); !errors.As(err, &bp) || !strings.Contains(bp.Reason, "free") {
		t.Fatalf("upload on a full disk: %v", err)
	}
	if _, err := m.Merge(info.UUID, cowformat.ClusterSize, cowformat.ClusterSize); !errors.As(err, &bp) {
		t.Fatalf("merge on a full disk: %v", err)
	}
	if st, _ := m.Status(info.UUID); st.State != StateActive || st.TotalClusters != 0 {
		t.Fatalf("%+v", st)
	}
}

func TestShutdown(t *testing.T) {
	e := newEnv(t)
	e.original("s", 1, make([]byte, cowformat.ClusterSize))
	m := e.manager(nil)
	info, _ := m.Create("s", 1, cowformat.BitfieldSize)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	var bp *BackPressureError
	if err := m.Update(info.UUID, Update{}); !errors.As(err, &bp) {
		t.Fatalf("update after close: %v", err)
	}
	if _, err := m.Create("s", 1, cowformat.BitfieldSize); !errors.As(err, &bp) {
		t.Fatalf("create after close: %v", err)
	}
	if err := m.Start(t.Context()); err == nil {
		t.Fatal("Start after Close")
	}
}

// TestInterruptedCreate: a directory without session.json (Create
// crashed before writing it) is removed; other directories are left.
func TestInterruptedCreate(t *testing.T) {
	e := newEnv(t)
	half := filepath.Join(e.work, uuid.New())
	os.Mkdir(half, 0o755)
	if err := createStoreFiles(half); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(e.work, "not-a-session")
	os.Mkdir(other, 0o755)
	broken := filepath.Join(e.work, uuid.New())
	os.Mkdir(broken, 0o755)
	os.WriteFile(filepath.Join(broken, sessionFileName), []byte("{"), 0o644)
	m := e.manager(nil)
	if len(m.sessions) != 0 {
		t.Fatalf("%d sessions", len(m.sessions))
	}
	if _, err := os.Stat(half); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("half-created session directory kept: %v", err)
	}
	for _, d := range []string{other, broken} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s removed: %v", d, err)
		}
	}
}

func TestRetention(t *testing.T) {
	e := newEnv(t)
	e.cfg.Retention = time.Hour
	e.cfg.AbandonAfter = 2 * time.Hour
	rng := rand.New(rand.NewPCG(47, 48))
	original := randBytes(rng, cowformat.ClusterSize)
	e.original("ret", 1, original)
	var mu sync.Mutex
	clock := time.Now().Add(-24 * time.Hour).Truncate(time.Second)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	m := e.manager(func(m *Manager) { m.now = now })

	done, _ := m.Create("ret", 1, cowformat.BitfieldSize)
	failed, _ := m.Create("ret", 1, cowformat.BitfieldSize)
	abandoned, _ := m.Create("ret", 1, cowformat.BitfieldSize)
	busy, _ := m.Create("ret", 1, cowformat.BitfieldSize)
	mustUpdate(t, m, done.UUID, randomUpload(rng, 0, 0.2), false)
	if _, err := m.Merge(done.UUID, cowformat.ClusterSize, cowformat.ClusterSize); err != nil {
		t.Fatal(err)
	}
	waitFinished(t, m, done.UUID)
	if _, err := m.Merge(failed.UUID, cowformat.ClusterSize, cowformat.ClusterSize); !errors.Is(err, ErrConflict) {
		t.Fatal(err)
	}
	exists := func(id string) bool {
		_, err := os.Stat(filepath.Join(e.work, id))
		_, serr := m.Status(id)
		if (err == nil) != (serr == nil) {
			t.Fatalf("session %s: directory %v, status %v", id, err, serr)
		}
		return err == nil
	}

	advance(59 * time.Minute)
	m.sweep()
	for _, id := range []string{done.UUID, failed.UUID, abandoned.UUID, busy.UUID} {
		if !exists(id) {
			t.Fatalf("session %s deleted too early", id)
		}
	}
	advance(2 * time.Minute) // 61 min
	mustUpdate(t, m, busy.UUID, randomUpload(rng, 0, 0.1), false)
	m.sweep()
	if exists(done.UUID) || exists(failed.UUID) {
		t.Fatal("finished sessions kept past the retention time")
	}
	if e.destFile("ret.r2") == nil {
		t.Fatal("the merged revision was deleted with its session")
	}
	advance(60 * time.Minute) // 121 min: abandoned is idle for 121 min, busy for 60
	m.sweep()
	if exists(abandoned.UUID) {
		t.Fatal("abandoned session kept")
	}
	if !exists(busy.UUID) {
		t.Fatal("active session deleted")
	}
	if err := m.Update(abandoned.UUID, Update{}); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("upload to a deleted session: %v", err)
	}
	// The idle time survives a restart: the journal's mtime counts as
	// the last upload (it is the fake clock's time of that upload here).
	m.Close()
	uploaded := clock.Add(-60 * time.Minute)
	os.Chtimes(filepath.Join(e.work, busy.UUID, journalFileName), uploaded, uploaded)
	m2 := e.manager(func(m *Manager) { m.now = now })
	advance(59 * time.Minute) // idle 119 min
	m2.sweep()
	if _, err := m2.Status(busy.UUID); err != nil {
		t.Fatalf("recently used session deleted after restart: %v", err)
	}
	advance(2 * time.Minute) // idle 121 min
	m2.sweep()
	if _, err := m2.Status(busy.UUID); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("idle session kept after restart: %v", err)
	}
}

// TestRetentionBackground uses the real clock and the sweep loop.
func TestRetentionBackground(t *testing.T) {
	e := newEnv(t)
	e.cfg.Retention = 20 * time.Millisecond
	e.cfg.AbandonAfter = time.Hour
	e.cfg.SweepInterval = 10 * time.Millisecond
	e.original("bg", 1, make([]byte, cowformat.ClusterSize))
	m := e.manager(nil)
	done, _ := m.Create("bg", 1, cowformat.BitfieldSize)
	active, _ := m.Create("bg", 1, cowformat.BitfieldSize)
	m.Merge(done.UUID, cowformat.ClusterSize, cowformat.ClusterSize)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := m.Status(done.UUID); errors.Is(err, ErrSessionNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("done session not deleted by the background sweep")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := m.Status(active.UUID); err != nil {
		t.Fatal(err)
	}
}

// TestNoGoroutineLeak: after Close, nothing the Manager started runs.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	e := newEnv(t)
	e.cfg.SweepInterval = time.Millisecond
	e.original("leak", 1, make([]byte, 3*cowformat.ClusterSize))
	m := e.manager(nil)
	a, _ := m.Create("leak", 1, cowformat.BitfieldSize)
	b, _ := m.Create("leak", 1, cowformat.BitfieldSize)
	mustUpdate(t, m, a.UUID, &upload{cluster: 1}, false)
	m.Merge(a.UUID, 3*cowformat.ClusterSize, 3*cowformat.ClusterSize)
	waitFinished(t, m, a.UUID)
	m.Merge(b.UUID, 3*cowformat.ClusterSize, 3*cowformat.ClusterSize)
	m.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after Close:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}
