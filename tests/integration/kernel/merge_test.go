package kernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/upload"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// mergerProc is a dnbd3-merger process; startMerger starts one with the
// given directories on a fresh port.
type mergerProc struct {
	p    *proc
	addr string
	args []string
}

func startMerger(t *testing.T, work, orig, dest string) *mergerProc {
	t.Helper()
	port := 17000 + int(nextPort.Add(1))
	m := &mergerProc{addr: fmt.Sprintf("127.0.0.1:%d", port)}
	m.args = []string{"--settings", "", "--working-dir", work, "--original-dir", orig, "--destination-dir", dest,
		"--listen", "http://" + m.addr, "--min-free-space", "0"}
	m.start(t)
	return m
}

func (m *mergerProc) start(t *testing.T) {
	t.Helper()
	m.p = start(t, nil, "dnbd3-merger", m.args...)
	if err := testutil.WaitListening(m.addr, 20*time.Second); err != nil {
		t.Fatalf("dnbd3-merger does not listen: %v\n%s", err, m.p.output())
	}
}

func (m *mergerProc) kill(t *testing.T) {
	t.Helper()
	m.p.cmd.Process.Signal(syscall.SIGKILL)
	m.p.wait(10 * time.Second)
}

// sessionUUID reads the merger session id from a session's status file.
func sessionUUID(t *testing.T, sess string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(sess, "status"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`uuid=([0-9a-f-]{36})`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no uuid in the status file:\n%s", b)
	}
	return string(m[1])
}

// waitState polls the merger until the session is in one of states.
func waitState(t *testing.T, addr, uuid string, within time.Duration, states ...string) string {
	t.Helper()
	mc, err := upload.NewMergerClient(addr, upload.MergerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(within)
	last := ""
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := mc.Status(ctx, uuid)
		cancel()
		if err == nil {
			last = st.State
			for _, s := range states {
				if st.State == s {
					return s
				}
			}
			if st.State == "Failed" {
				t.Fatalf("merge failed")
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("session %s never reached %v (last %q)", uuid, states, last)
	return ""
}

// TestMergeEndToEnd: a filesystem written through a COW device becomes
// revision 2 on detach with -m; the server serves it as the latest, and a
// read-only attach of it shows the files.
func TestMergeEndToEnd(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "m.r1"), 96<<20)
	_, addr := server(t, base)
	mg := startMerger(t, t.TempDir(), base, base)
	sess := t.TempDir()
	p, dev, _ := attachCmd(t, "-h", addr, "-i", "m", "-c", sess, "-C", mg.addr, "-m", "--upload-delay", "0", "--cow-stats-file")
	mkfs(t, dev)
	mnt := mountDev(t, dev)
	sums := writeTree(t, mnt, 5)
	umount(t, mnt)
	want := testutil.SHA256File(t, dev)
	uuid := sessionUUID(t, sess)
	if out, code := nbd(t, "detach", dev); code != 0 {
		t.Fatalf("detach: %s", out)
	}
	if c := p.wait(120 * time.Second); c != 0 {
		t.Fatalf("attach exited %d:\n%s", c, p.output())
	}
	waitState(t, mg.addr, uuid, 120*time.Second, "Done")
	r2 := filepath.Join(base, "m.r2")
	if got := testutil.SHA256File(t, r2); got != want {
		t.Fatal("m.r2 differs from what the device showed before detach")
	}
	// the server serves it as the latest revision; a read-only attach of
	// rid 0 gets rid 2 and shows the files
	_, dev2, _ := attachCmd(t, "-h", addr, "-i", "m")
	if rid := statusJSON(t, dev2)["rid"].(float64); rid != 2 {
		t.Fatalf("rid 0 resolved to %v, want 2", rid)
	}
	mnt2 := mountDev(t, dev2, "-o", "ro,noload")
	verifyTree(t, mnt2, sums)
	umount(t, mnt2)
}

// cowServerAndMerger starts a server on disk/images and a merger
// (working directory disk/merger-work) merging there, and empties the
// session directory disk/session.
func cowServerAndMerger(t *testing.T, disk, session string) (addr string, mg *mergerProc, sess string) {
	t.Helper()
	images := disk + "/images"
	_, addr = server(t, images)
	work := disk + "/merger-work"
	os.MkdirAll(work, 0o755)
	mg = startMerger(t, work, images, images)
	sess = disk + "/" + session
	os.RemoveAll(sess)
	os.MkdirAll(sess, 0o755)
	return addr, mg, sess
}

// TestCowtestSequenceWithMerger runs the reference CI's standard sequence
// with a real merger: -t on a new session while the merger is killed and
// restarted during the uploads, detach; -L with -m, -v, detach; the merger
// is killed again during the merge; after its restart the merged revision
// test.r2 passes -v.
func TestCowtestSequenceWithMerger(t *testing.T) {
	requireNBD(t)
	disk := cowDisk(t)
	images := disk + "/images"
	os.RemoveAll(images + "/test.r2")
	addr, mg, sess := cowServerAndMerger(t, disk, "session-merged")

	p, dev, _ := attachCmd(t, "-h", addr, "-i", "test", "-c", sess, "-C", mg.addr, "--upload-delay", "0", "--cow-stats-file", "--block-size", "4096")
	killed := make(chan struct{})
	go func() {
		defer close(killed)
		time.Sleep(20 * time.Second)
		mg.kill(t)
		time.Sleep(3 * time.Second)
		mg.start(t)
	}()
	cowtest(t, "-t", dev)
	<-killed
	p.cmd.Process.Signal(syscall.SIGTERM)
	if c := p.wait(10 * time.Minute); c != 0 {
		t.Fatalf("attach exited %d after the final upload:\n%s", c, p.output())
	}
	uuid := sessionUUID(t, sess)

	p2, dev2, _ := attachCmd(t, "-h", addr, "-i", "test", "-L", sess, "-C", mg.addr, "-m", "--cow-stats-file", "--block-size", "4096")
	cowtest(t, "-v", dev2)
	p2.cmd.Process.Signal(syscall.SIGTERM)
	if c := p2.wait(10 * time.Minute); c != 0 {
		t.Fatalf("attach -m exited %d:\n%s", c, p2.output())
	}
	if st, _ := os.ReadFile(filepath.Join(sess, "status")); !strings.Contains(string(st), "state=done") {
		t.Errorf("status file:\n%s", st)
	}
	// kill the merger in the middle of the merge
	state := waitState(t, mg.addr, uuid, 5*time.Minute, "Copying", "Merging", "Done")
	if state == "Done" {
		t.Fatal("the merge finished before it could be interrupted")
	}
	mg.kill(t)
	if _, err := os.Stat(images + "/test.r2"); err == nil {
		t.Fatal("test.r2 is visible although the merge was interrupted")
	}
	t.Logf("merger killed while %s", state)
	mg.start(t)
	waitState(t, mg.addr, uuid, 15*time.Minute, "Done")
	cowtest(t, "-v", images+"/test.r2")
	// dnbd3-server serves it as the latest revision
	out, code := nbd(t, "get", "-h", addr, "-i", "test", "--length", "4096", "-o", "/dev/null")
	if code != 0 || !strings.Contains(out, "test rid 2") {
		t.Fatalf("get of the latest revision: exit %d\n%s", code, out)
	}
}
