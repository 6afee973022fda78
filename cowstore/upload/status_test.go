package upload

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// statusKeys lists the keys of a status file's lines, in order.
func statusKeys(text string) []string {
	var keys []string
	for _, line := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		k, _, _ := strings.Cut(line, "=")
		keys = append(keys, k)
	}
	return keys
}

func TestStatusTextMatchesReferenceFormat(t *testing.T) {
	ref, err := os.ReadFile(fixture(t, "status"))
	if err != nil {
		t.Fatal(err)
	}
	s := statusInfo{UUID: fixtureUUID, State: StateBackgroundUpload, ModifiedClusters: 3}
	// The reference pads with newlines; without the padding the texts are
	// identical.
	if got, want := s.text(), strings.TrimRight(string(ref), "\n")+"\n"; got != want {
		t.Fatalf("status text\n%q\nwant\n%q", got, want)
	}
	s = statusInfo{UUID: "u", State: StateDone, InQueue: 1, ModifiedClusters: 2, IdleClusters: 3, TotalClustersUploaded: 4, ActiveUploads: 5, AvgSpeedKB: 6.789}
	want := "[General]\nuuid=u\nstate=done\ninQueue=1\nmodifiedClusters=2\nidleClusters=3\ntotalClustersUploaded=4\nactiveUploads=5\navgSpeedKb=6.79\n"
	if got := s.text(); got != want {
		t.Fatalf("got %q", got)
	}
	if got, want := statusKeys(s.text()), statusKeys(string(ref)); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("keys %v, reference %v", got, want)
	}
}

func TestStatusSpeed(t *testing.T) {
	e := newEnv(t)
	e.cfg.StatusFile = filepath.Join(t.TempDir(), "status")
	u := e.uploader()
	u.bytes.Add(12328)
	e.clock.Advance(time.Second)
	if s := u.collectStatus(StateBackgroundUpload); s.text() == "" || s.AvgSpeedKB != 12.328 {
		t.Fatalf("speed %v", s.AvgSpeedKB)
	}
	u.bytes.Add(5000)
	e.clock.Advance(2 * time.Second)
	if s := u.collectStatus(StateBackgroundUpload); s.AvgSpeedKB != 2.5 {
		t.Fatalf("speed %v", s.AvgSpeedKB)
	}
	if s := u.collectStatus(StateBackgroundUpload); s.AvgSpeedKB != 0 { // no time passed
		t.Fatalf("speed %v", s.AvgSpeedKB)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, _ := os.ReadFile(path)
	return string(b)
}

func TestStatusFileLifecycle(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "status")
	e := newEnv(t)
	e.cfg.StatusFile = path
	e.session(t)
	// Cluster 0 is due, 1 and 2 are not, 3 was uploaded in an earlier
	// attach.
	e.src.write(0, 0, 1)
	e.clock.Advance(time.Minute)
	e.src.write(1, 0, 1)
	e.src.write(2, 0, 1)
	e.src.write(3, 0, 1)
	e.src.markClean(3)

	// At start the file holds the uuid and state=active.
	u := e.uploader()
	stop := runBG(t, u)
	waitFor(t, "initial status", func() bool { return readFile(t, path) != "" })
	if got := readFile(t, path); got != "[General]\nuuid="+fixtureUUID+"\nstate=active\n" {
		// Run may not have uploaded yet; the content must be the initial one.
		t.Fatalf("initial status %q", got)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("status file mode %v, %v", fi.Mode(), err)
	}
	waitFor(t, "cluster 0 uploaded", func() bool { return !e.src.dirty(0) })
	stop()

	// While attached (state backgroundUpload), with a short interval.
	e.cfg.StatsInterval = 5 * time.Millisecond
	u2 := e.uploader()
	u2.uploaded.Store(1) // as if it had uploaded cluster 0
	stop2 := runBG(t, u2)
	want := "[General]\nuuid=" + fixtureUUID + "\nstate=backgroundUpload\ninQueue=0\nmodifiedClusters=2\nidleClusters=2\ntotalClustersUploaded=1\nactiveUploads=0\navgSpeedKb=0.00\n"
	waitFor(t, "backgroundUpload status", func() bool { return readFile(t, path) == want })
	stop2()

	// During the final flush: state uploading, written before the first
	// upload.
	e.cfg.StatsInterval = time.Hour
	u3 := e.uploader()
	u3.uploaded.Store(1)
	var (
		mu     sync.Mutex
		during string
	)
	e.srv.SetUpdateHook(func(string, int) {
		mu.Lock()
		defer mu.Unlock()
		if during == "" {
			during = readFile(t, path)
		}
	})
	if _, err := u3.Finish(t.Context(), false); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := "[General]\nuuid=" + fixtureUUID + "\nstate=uploading\ninQueue=2\nmodifiedClusters=0\nidleClusters=2\ntotalClustersUploaded=1\nactiveUploads=0\navgSpeedKb=0.00\n"; during != want {
		t.Fatalf("status during the final flush\n%q\nwant\n%q", during, want)
	}
	// And the final state really is written.
	if got, want := readFile(t, path), "[General]\nuuid="+fixtureUUID+"\nstate=done\ninQueue=0\nmodifiedClusters=0\nidleClusters=4\ntotalClustersUploaded=3\nactiveUploads=0\navgSpeedKb=0.00\n"; got != want {
		t.Fatalf("final status\n%q\nwant\n%q", got, want)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}
}

func TestStatusDoneAfterFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "status")
	e := newEnv(t)
	e.cfg.StatusFile = path
	e.cfg.FinalRounds = 1
	e.srv.FailUpdate(mergertest.Fault{Status: 500})
	e.session(t)
	e.src.write(0, 0, 1)
	e.src.write(5, 0, 1)
	if _, err := e.uploader().Finish(t.Context(), true); err == nil {
		t.Fatal("Finish succeeded")
	}
	if got, want := readFile(t, path), "[General]\nuuid="+fixtureUUID+"\nstate=done\ninQueue=2\nmodifiedClusters=0\nidleClusters=0\ntotalClustersUploaded=0\nactiveUploads=0\navgSpeedKb=0.00\n"; got != want {
		t.Fatalf("final status %q", got)
	}
}

func TestStatsToLog(t *testing.T) {
	var buf testutil.Buffer
	e := newEnv(t)
	e.cfg.StatsToLog = true
	e.cfg.StatsInterval = 5 * time.Millisecond
	e.cfg.Logger = slog.New(slog.NewTextHandler(&buf, nil))
	e.session(t)
	e.src.write(7, 0, 1)
	stop := runBG(t, e.uploader())
	want := `msg="cow upload status" uuid=` + fixtureUUID + ` state=backgroundUpload inQueue=0 modifiedClusters=1 idleClusters=0 totalClustersUploaded=0 activeUploads=0 avgSpeedKb=0.00`
	waitFor(t, "status log line", func() bool { return strings.Contains(buf.String(), want) })
	stop()
	if strings.Contains(buf.String(), "level=WARN") {
		t.Fatalf("unexpected warnings:\n%s", buf.String())
	}
}

// TestStatsOut: --cow-stats-stdout prints the status file's INI text, one
// report per interval, each followed by an empty line, and the final one
// with state=done.
func TestStatsOut(t *testing.T) {
	var buf testutil.Buffer
	e := newEnv(t)
	e.cfg.StatsOut = &buf
	e.cfg.StatsInterval = 5 * time.Millisecond
	e.session(t)
	e.src.write(7, 0, 1)
	stop := runBG(t, e.uploader())
	want := "[General]\nuuid=" + fixtureUUID + "\nstate=backgroundUpload\ninQueue=0\nmodifiedClusters=1\nidleClusters=0\ntotalClustersUploaded=0\nactiveUploads=0\navgSpeedKb=0.00\n\n"
	waitFor(t, "status report on the writer", func() bool { return strings.Contains(buf.String(), want) })
	stop()
	if _, err := e.uploader().Finish(t.Context(), false); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if !strings.HasPrefix(out, "[General]\n") || !strings.HasSuffix(out, "\n\n") || !strings.Contains(out, "state=done\n") {
		t.Fatalf("stats output:\n%s", out)
	}
	if strings.Contains(out, "msg=") || strings.Contains(out, "level=") {
		t.Fatalf("log lines on the stats writer:\n%s", out)
	}
}

func TestStatusFileUnwritable(t *testing.T) {
	var buf testutil.Buffer
	e := newEnv(t)
	e.cfg.StatusFile = filepath.Join(t.TempDir(), "missing-dir", "status")
	e.cfg.Logger = slog.New(slog.NewTextHandler(&buf, nil))
	e.session(t)
	e.src.write(0, 0, 1)
	if _, err := e.uploader().Finish(t.Context(), false); err != nil {
		t.Fatalf("an unwritable status file must not fail the upload: %v", err)
	}
	if !strings.Contains(buf.String(), "cannot write the COW status file") {
		t.Fatalf("no warning logged:\n%s", buf.String())
	}
}
