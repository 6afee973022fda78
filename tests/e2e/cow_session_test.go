package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// startMerger runs dnbd3-merger on a loopback port with base as the
// directory of original and merged images, and the extra arguments, and
// returns its host:port.
func startMerger(t *testing.T, base string, extra ...string) string {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	var log bytes.Buffer
	cmd := exec.Command(bin("dnbd3-merger"), "--settings", "", "--working-dir", t.TempDir(), "--original-dir", base,
		"--destination-dir", base, "--listen", "http://"+addr, "--min-free-space", "0")
	cmd.Args = append(cmd.Args, extra...)
	cmd.Stdout, cmd.Stderr = syncWriter(&log), syncWriter(&log)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			logMu.Lock()
			t.Logf("dnbd3-merger log:\n%s", log.String())
			logMu.Unlock()
		}
	})
	if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
		t.Fatalf("dnbd3-merger did not listen on %s: %v", addr, err)
	}
	return addr
}

// waitFile waits until path exists.
func waitFile(t *testing.T, path string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %s", path, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestServeLongImageNameMergesIntoItsImage: the session header keeps 199
// bytes of an image name. With an image whose name is 204 bytes and
// another named by its first 199 bytes, `serve -c -C -m` on the long one
// must merge into the long one's next revision.
func TestServeLongImageNameMergesIntoItsImage(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	// path components stay below the scan's 150-byte limit
	long := strings.Repeat("d", 100) + "/" + strings.Repeat("e", 99) + "/img"
	prefix := long[:199]
	base := t.TempDir()
	original := randomImage(t, filepath.Join(base, long+".r1"), 4<<20)
	randomImage(t, filepath.Join(base, prefix+".r1"), 4<<20+4096)
	d := startDaemon(t, base)
	merger := startMerger(t, base)

	uri, stop := startServe(t, d.addr, long, "-c", t.TempDir(), "-C", merger, "-m", "--upload-delay", "0")
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 65536", "-c", "flush", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	if err := stop(); err != nil {
		t.Fatalf("serve: %v", err)
	}
	merged := filepath.Join(base, long+".r2")
	waitFile(t, merged, 60*time.Second)
	want := bytes.Clone(original)
	copy(want, bytes.Repeat([]byte{0x5a}, 65536))
	if got, err := os.ReadFile(merged); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s.r2 is not %s.r1 with the write: %v", "LONG", "LONG", err)
	}
	if _, err := os.Stat(filepath.Join(base, prefix+".r2")); err == nil {
		t.Fatal("the changes to the 204-byte image were merged into the 199-byte one")
	}
}

// zeroRemote is a remote image for a Load that must not get far.
type zeroRemote struct{}

func (zeroRemote) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }
func (zeroRemote) Size() int64                             { return 1 << 20 }

// servePID finds the dnbd3-nbd process that listens on sock.
func servePID(t *testing.T, sock string) int {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, _ := os.ReadFile(filepath.Join(d, "cmdline"))
		if bytes.Contains(b, []byte("unix:"+sock+"\x00")) && bytes.Contains(b, []byte("dnbd3-nbd")) {
			pid, _ := strconv.Atoi(filepath.Base(d))
			return pid
		}
	}
	t.Fatalf("no dnbd3-nbd process listens on %s", sock)
	return 0
}

// TestServeSessionLockedAcrossProcesses: while one `serve` has a session
// open, a second `serve -L` of it and an in-process Load are refused with
// the first one's PID; once it stops, the session loads.
func TestServeSessionLockedAcrossProcesses(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "w.r1"), 1<<20)
	d := startDaemon(t, base)
	sess := t.TempDir()
	uri, stop := startServe(t, d.addr, "w", "-c", sess)
	sock := strings.TrimPrefix(uri, "nbd+unix:///?socket=")
	holder := "process " + strconv.Itoa(servePID(t, sock))

	// the second one must give up at once; if it starts serving, it is
	// stopped after 20 s
	other := filepath.Join(t.TempDir(), "other.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	second := exec.CommandContext(ctx, bin("dnbd3-nbd"), "serve", "-h", d.addr, "-i", "w", "--listen", "unix:"+other, "-L", sess)
	second.Stderr = &stderr
	second.Run()
	if code := second.ProcessState.ExitCode(); ctx.Err() != nil || code != 1 || !strings.Contains(stderr.String(), "in use by "+holder) {
		t.Fatalf("second serve -L of an open session: exit %d (stopped after 20 s: %v), stderr %q; want exit 1 naming %s", code, ctx.Err() != nil, stderr.String(), holder)
	}
	if _, err := cowstore.Load(sess, cowstore.Options{Remote: zeroRemote{}, ImageName: "w", CommitInterval: -1}); err == nil || !strings.Contains(err.Error(), holder) {
		t.Fatalf("in-process Load: %v, want an error naming %s", err, holder)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	_, stop2 := startServe(t, d.addr, "w", "-L", sess)
	if err := stop2(); err != nil {
		t.Fatalf("serve -L after the first stopped: %v", err)
	}
}
