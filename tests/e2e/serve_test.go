package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// needTool skips (visibly) when a Debian tool the test drives is missing.
func needTool(t *testing.T, name, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("SKIP: %s not installed (package %s; run scripts/deps.sh as root)", name, pkg)
	}
}

// startServe runs `dnbd3-nbd serve` for image against the dnbd3 server at
// addr and returns the NBD URI of its unix socket and a stop function:
// SIGINT, then the exit status (an error also for no exit within 10 s).
// Cleanup stops it too and fails the test on an unclean exit.
func startServe(t *testing.T, addr, image string, extra ...string) (uri string, stop func() error) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command(bin("dnbd3-nbd"), append([]string{"serve", "-h", addr, "-i", image, "--listen", "unix:" + sock}, extra...)...)
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = syncWriter(&stderr)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	var stopErr error
	stop = func() error {
		once.Do(func() {
			cmd.Process.Signal(os.Interrupt)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					stopErr = fmt.Errorf("dnbd3-nbd serve exited with %v after SIGINT:\n%s", err, stderr.String())
				}
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				stopErr = errors.New("dnbd3-nbd serve did not stop within 10 s of SIGINT")
			}
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("serve printed no address: %v\n%s", err, stderr.String())
	}
	if strings.TrimSpace(line) != sock {
		t.Fatalf("serve printed %q, want %q", line, sock)
	}
	return "nbd+unix:///?socket=" + sock, stop
}

// TestServeWithLibnbdTools exports an image from dnbd3-server through
// `dnbd3-nbd serve` and reads it with libnbd's nbdinfo and nbdcopy.
func TestServeWithLibnbdTools(t *testing.T) {
	needTool(t, "nbdinfo", "libnbd-bin")
	needTool(t, "nbdcopy", "libnbd-bin")
	base := t.TempDir()
	img := filepath.Join(base, "vm", "disk.r2")
	randomImage(t, img, 48<<20+4096)
	d := startDaemon(t, base)
	uri, _ := startServe(t, d.addr, "vm/disk")

	out, err := exec.Command("nbdinfo", "--json", uri).Output()
	if err != nil {
		t.Fatalf("nbdinfo: %v", err)
	}
	var info struct {
		Exports []struct {
			Name     string `json:"export-name"`
			Size     int64  `json:"export-size"`
			ReadOnly bool   `json:"is_read_only"`
			Multi    bool   `json:"can_multi_conn"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo output %s: %v", out, err)
	}
	e := info.Exports[0]
	if e.Size != 48<<20+4096 || !e.ReadOnly || !e.Multi {
		t.Fatalf("nbdinfo: %+v\n%s", e, out)
	}
	if out, err := exec.Command("nbdinfo", "--list", uri).CombinedOutput(); err != nil || !strings.Contains(string(out), "vm/disk") {
		t.Errorf("nbdinfo --list: %v\n%s", err, out)
	}

	want := testutil.SHA256File(t, img)
	copies := [][]string{
		{"--connections=4"},
		{"--connections=1", "--requests=16"},
		{"--connections=2"},
	}
	dsts := make([]string, len(copies))
	errs := make([]error, len(copies))
	var wg sync.WaitGroup
	for i, args := range copies {
		dsts[i] = filepath.Join(t.TempDir(), fmt.Sprintf("copy%d.img", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := exec.Command("nbdcopy", append(args, uri, dsts[i])...).CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("nbdcopy %v: %v\n%s", args, err, out)
			}
		}()
	}
	wg.Wait()
	for i, args := range copies {
		if errs[i] != nil {
			t.Error(errs[i])
		} else if got := testutil.SHA256File(t, dsts[i]); got != want {
			t.Errorf("nbdcopy %v: sha256 %s, want %s", args, got, want)
		}
	}
	// writes are refused on the read-only export
	needTool(t, "qemu-io", "qemu-utils")
	out, _ = exec.Command("qemu-io", "-f", "raw", "-c", "write 0 4096", uri).CombinedOutput()
	if lo := strings.ToLower(string(out)); !strings.Contains(lo, "read-only") && !strings.Contains(lo, "not permitted") && !strings.Contains(lo, "permission denied") {
		t.Errorf("qemu-io write on the read-only export: %s", out)
	}
}

// TestServeCOWWritable exports a copy-on-write session with `serve -c`,
// writes through qemu-io, stops (the final upload reaches the merger),
// serves the session again with -L and reads it back with nbdcopy.
func TestServeCOWWritable(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	needTool(t, "nbdcopy", "libnbd-bin")
	base := t.TempDir()
	img := filepath.Join(base, "w.r1")
	original := randomImage(t, img, 8<<20)
	d := startDaemon(t, base)
	m := mergertest.Start(t)
	sess := t.TempDir()

	uri, stop := startServe(t, d.addr, "w", "-c", sess, "-C", m.Addr, "--cow-stats-file", "--upload-delay", "0")
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000000 3000000", "-c", "flush", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	if err := stop(); err != nil {
		t.Fatalf("serve -c: %v", err)
	}
	want := append([]byte(nil), original...)
	for i := 1000000; i < 4000000; i++ {
		want[i] = 0x5a
	}
	uuids := m.Sessions()
	if len(uuids) != 1 {
		t.Fatalf("merger sessions %v", uuids)
	}
	if s, _ := m.Session(uuids[0]); len(s.Clusters) != 4 {
		t.Errorf("merger got %d clusters, want 4 (bytes 1,000,000..4,000,000 lie in clusters 0-3)", len(s.Clusters))
	}
	if st, _ := os.ReadFile(filepath.Join(sess, "status")); !strings.Contains(string(st), "state=done") {
		t.Errorf("status file: %s", st)
	}

	uri2, _ := startServe(t, d.addr, "w", "-L", sess)
	dst := filepath.Join(t.TempDir(), "back.img")
	if out, err := exec.Command("nbdcopy", uri2, dst).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, want) {
		t.Fatal("the session read back differs from what was written")
	}
}
