package cowstore

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// The writeback test records every write and sync a session makes and
// rebuilds the files as a power loss could leave them: everything up to
// a file's last sync, plus any subset of what was written after it. The
// unit of a write that may or may not be on disk is a 512-byte sector of
// meta (the overlay assumes sector writes are atomic, see doc.go) and a
// 4 KiB page of data; a unit that is there holds its content as of one of
// the writes to it (the page cache writes back whole pages).

// ioEvent is a recorded write (the units it touched, as they were after
// the write) or sync.
type ioEvent struct {
	file  string
	sync  bool
	units map[int64][]byte // unit index -> content after the write
}

// ioRecorder records the writes and syncs of one session's files.
type ioRecorder struct {
	mu     sync.Mutex
	events []ioEvent
	shadow map[string]map[int64][]byte // current content of each unit
}

func unitSize(file string) int64 {
	if file == "meta" {
		return 512
	}
	return cowformat.BlockSize
}

func (r *ioRecorder) wrap(name string, f storeFile) storeFile {
	return &recordedFile{storeFile: f, name: name, rec: r}
}

func (r *ioRecorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

type recordedFile struct {
	storeFile
	name string
	rec  *ioRecorder
}

func (f *recordedFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.storeFile.WriteAt(p, off)
	r := f.rec
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.shadow == nil {
		r.shadow = map[string]map[int64][]byte{"meta": {}, "data": {}}
	}
	us := unitSize(f.name)
	ev := ioEvent{file: f.name, units: map[int64][]byte{}}
	for pos := int64(0); pos < int64(n); {
		u := (off + pos) / us
		in := (off + pos) % us
		cur := bytes.Clone(r.shadow[f.name][u])
		if cur == nil {
			cur = make([]byte, us)
		}
		k := copy(cur[in:], p[pos:n])
		r.shadow[f.name][u] = cur
		ev.units[u] = cur
		pos += int64(k)
	}
	r.events = append(r.events, ev)
	return n, err
}

func (f *recordedFile) Datasync() error {
	err := f.storeFile.Datasync()
	f.rec.mu.Lock()
	f.rec.events = append(f.rec.events, ioEvent{file: f.name, sync: true})
	f.rec.mu.Unlock()
	return err
}

// materialize writes into dir the files as a power loss just before
// event cut could leave them; keep decides whether an unsynced unit
// write reached the disk.
func (r *ioRecorder) materialize(t *testing.T, dir string, cut int, keep func() bool) {
	t.Helper()
	for _, name := range []string{"meta", "data"} {
		lastSync := -1
		for i, ev := range r.events[:cut] {
			if ev.file == name && ev.sync {
				lastSync = i
			}
		}
		disk := map[int64][]byte{}
		for i, ev := range r.events[:cut] {
			if ev.file != name || ev.sync {
				continue
			}
			for u, b := range ev.units {
				if i < lastSync || keep() {
					disk[u] = b
				}
			}
		}
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if name == "meta" {
			f.Truncate(cowformat.MetaSize)
		}
		us := unitSize(name)
		for u, b := range disk {
			if _, err := f.WriteAt(b, u*us); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
	}
}

// TestCommitWritebackOrder runs the crash workload once, recording its
// I/O, and then rebuilds the session as a power loss at many points
// could leave it, with the unsynced writes reaching the disk in any
// combination. Every rebuilt session must load, show every block as it
// was at the last acknowledged flush or as the commit under way would
// have left it, and take further writes safely.
func TestCommitWritebackOrder(t *testing.T) {
	steps := crashWorkload()
	states, commits := crashStates(steps)
	blocks := checkBlocks(states)

	src := t.TempDir()
	rec := &ioRecorder{}
	opts := crashOpts()
	opts.wrapFile = rec.wrap
	o, err := Create(src, opts)
	if err != nil {
		t.Fatal(err)
	}
	start := rec.len()
	// ackAt[i] is the event count when state i was acknowledged
	ackAt := map[int]int{0: start}
	for i, s := range steps {
		if err := runStep(o, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		if commits[i] {
			ackAt[i+1] = rec.len()
		}
	}
	end := rec.len()
	o.Close()
	revision, err := os.ReadFile(revisionFile(src))
	if err != nil {
		t.Fatal(err)
	}

	trial := func(cut int, keep func() bool, what string) {
		t.Helper()
		dir := t.TempDir()
		rec.materialize(t, dir, cut, keep)
		os.WriteFile(revisionFile(dir), revision, 0o600)
		acked := 0
		for s, at := range ackAt {
			if at <= cut && s > acked {
				acked = s
			}
		}
		from, to := allowedStates(commits, acked)
		o, err := Load(dir, crashOpts())
		if err != nil {
			t.Fatalf("%s: power loss before event %d (acknowledged state %d): load: %v", what, cut, acked, err)
		}
		if err := checkCrashed(o, states, from, to, blocks); err != nil {
			o.Close()
			t.Fatalf("%s: power loss before event %d (acknowledged state %d): %v", what, cut, acked, err)
		}
		checkContinue(t, dir, crashOpts(), o, blocks)
	}
	// every point with all or none of the unsynced writes on disk
	for cut := start; cut <= end; cut++ {
		trial(cut, func() bool { return true }, "all unsynced writes")
		trial(cut, func() bool { return false }, "no unsynced write")
	}
	// random points with random subsets
	for seed := uint64(1); seed <= 150; seed++ {
		rng := rand.New(rand.NewPCG(seed, 3))
		cut := start + rng.IntN(end-start+1)
		p := rng.Float64()
		trial(cut, func() bool { return rng.Float64() < p }, fmt.Sprintf("seed %d", seed))
	}
	t.Logf("%d events after create, %d states", end-start, len(states))
}
