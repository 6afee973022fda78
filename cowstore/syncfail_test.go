package cowstore

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestSyncFailureIsPermanent injects EIO into each fdatasync of a commit
// (data; meta after the tables; meta after the header) and into a
// background commit. Like Linux, the injected sync fails once and the next
// one succeeds: the session must still refuse every later flush, write and
// resize, say why in the log, and load again with -L as of the last
// successful flush.
func TestSyncFailureIsPermanent(t *testing.T) {
	for _, c := range []struct {
		name       string
		file       string
		errs       []error
		background bool
	}{
		{"data sync", "data", []error{errInjectedEIO}, false},
		{"meta sync after the tables", "meta", []error{errInjectedEIO}, false},
		{"meta sync after the header", "meta", []error{nil, errInjectedEIO}, false},
		{"background commit", "data", []error{errInjectedEIO}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			remote := &memRemote{data: bytes.Repeat([]byte{0x11}, 4*cowformat.ClusterSize)}
			plan := &faultPlan{}
			var logs testutil.Buffer
			dir := t.TempDir()
			opts := Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1,
				Logger: slog.New(slog.NewTextHandler(&logs, nil)), wrapFile: plan.wrap}
			if c.background {
				opts.CommitInterval = 10 * time.Millisecond
			}
			o, err := Create(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			a := bytes.Repeat([]byte{0xAA}, cowformat.BlockSize)
			if _, err := o.WriteAt(a, 0); err != nil {
				t.Fatal(err)
			}
			if err := o.Flush(); err != nil {
				t.Fatal(err)
			}
			plan.failSyncs(c.file, c.errs...)
			// a new slot and a grown size: every step of the commit has work
			if _, err := o.WriteAt(bytes.Repeat([]byte{0xBB}, cowformat.BlockSize), 2*cowformat.ClusterSize+int64(len(remote.data))); err != nil {
				t.Fatal(err)
			}
			if c.background {
				deadline := time.Now().Add(10 * time.Second)
				for o.Failed() == nil && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
			} else if err := o.Flush(); !errors.Is(err, errInjectedEIO) {
				t.Fatalf("flush with a failing sync: %v", err)
			}
			// the failure stays, although the sync would now succeed
			for i := range 2 {
				if err := o.Flush(); !errors.Is(err, ErrFailed) || !errors.Is(err, errInjectedEIO) || !strings.Contains(err.Error(), "-L "+dir) {
					t.Fatalf("flush %d after the failure: %v, want the session's failure", i+1, err)
				}
			}
			if _, err := o.WriteAt(a, cowformat.BlockSize); !errors.Is(err, ErrFailed) {
				t.Errorf("write after the failure: %v", err)
			}
			if _, err := o.WriteAtFUA(a, cowformat.BlockSize); !errors.Is(err, ErrFailed) {
				t.Errorf("FUA write after the failure: %v", err)
			}
			if err := o.WriteZeroes(0, cowformat.BlockSize, true); !errors.Is(err, ErrFailed) {
				t.Errorf("zero write after the failure: %v", err)
			}
			if err := o.Resize(cowformat.BlockSize); !errors.Is(err, ErrFailed) {
				t.Errorf("resize after the failure: %v", err)
			}
			got := make([]byte, cowformat.BlockSize)
			if _, err := o.ReadAt(got, 0); err != nil || !bytes.Equal(got, a) {
				t.Errorf("read after the failure: %v", err)
			}
			if log := logs.String(); !strings.Contains(log, "COW session failed") || !strings.Contains(log, "-L") || !strings.Contains(log, "injected") {
				t.Errorf("log does not say why and what to do:\n%s", log)
			}
			if err := o.Close(); !errors.Is(err, ErrFailed) {
				t.Errorf("close after the failure: %v", err)
			}
			// -L is the way back, with the flushed block
			opts.wrapFile, opts.CommitInterval = nil, -1
			o2, err := Load(dir, opts)
			if err != nil {
				t.Fatalf("load after the failure: %v", err)
			}
			defer o2.Close()
			if _, err := o2.ReadAt(got, 0); err != nil || !bytes.Equal(got, a) {
				t.Errorf("flushed block after reload: %v", err)
			}
		})
	}
}

// TestMetaWriteFailureIsRetried: a failed write of metadata (nothing was
// synced, nothing lost) fails that flush only; the next flush writes the
// metadata and the data is there after a reload. A commit writes its
// metadata in several pieces (a new table, L1, the header): each of them
// fails in turn.
func TestMetaWriteFailureIsRetried(t *testing.T) {
	more := true
	for k := 1; more; k++ {
		more = false // stays false if the subtest skips
		t.Run(fmt.Sprintf("write %d", k), func(t *testing.T) { more = testMetaWriteFailure(t, k) })
		if k == 2 && !more && !t.Failed() {
			t.Fatal("the commit made a single meta write: the test does not cover the later ones")
		}
	}
}

// testMetaWriteFailure fails the k-th meta write of a commit. It reports
// false (and skips) when the commit made fewer writes.
func testMetaWriteFailure(t *testing.T, k int) (more bool) {
	remote := &memRemote{data: bytes.Repeat([]byte{0x11}, 2*cowformat.ClusterSize)}
	plan := &faultPlan{}
	dir := t.TempDir()
	opts := Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1, wrapFile: plan.wrap}
	o, err := Create(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	b := bytes.Repeat([]byte{0xCC}, cowformat.BlockSize)
	// a new slot and table, and a grown size: the commit writes a table,
	// L1 and the header
	grown := 3*cowformat.ClusterSize + int64(len(b))
	if _, err := o.WriteAt(b, grown-int64(len(b))); err != nil {
		t.Fatal(err)
	}
	enospc := errors.New("no space left on device (injected)")
	plan.failMetaWrites(append(make([]error, k-1), enospc)...)
	err = o.Flush()
	if err == nil && plan.metaErr() == enospc {
		o.Close()
		t.Skipf("the commit made fewer than %d meta writes", k)
	}
	if !errors.Is(err, enospc) || errors.Is(err, ErrFailed) {
		t.Fatalf("flush with a failing meta write: %v", err)
	}
	if err := o.Flush(); err != nil {
		t.Fatalf("flush after the write error went away: %v", err)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	opts.wrapFile = nil
	o2, err := Load(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer o2.Close()
	got := make([]byte, cowformat.BlockSize)
	if _, err := o2.ReadAt(got, grown-int64(len(b))); err != nil || !bytes.Equal(got, b) || o2.Size() != grown {
		t.Fatalf("block after reload: %v (size %d, want %d)", err, o2.Size(), grown)
	}
	return true
}

// TestFailedSessionUploadsNothing: after a failed sync the overlay hands
// no cluster to the uploader (its pages may have been dropped).
func TestFailedSessionUploadsNothing(t *testing.T) {
	plan := &faultPlan{}
	o, err := Create(t.TempDir(), Options{Remote: &memRemote{data: make([]byte, cowformat.ClusterSize)}, ImageName: "img", RID: 1, CommitInterval: -1, wrapFile: plan.wrap})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	o.WriteAt([]byte{1}, 0)
	if _, _, _, err := o.Snapshot(0); err != nil {
		t.Fatal(err)
	}
	plan.failSyncs("data", errInjectedEIO)
	o.Flush()
	if _, _, _, err := o.Snapshot(0); !errors.Is(err, ErrFailed) {
		t.Fatalf("snapshot of a failed session: %v", err)
	}
}
