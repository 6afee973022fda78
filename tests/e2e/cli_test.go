package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// daemon is a dnbd3-server process started from its binary.
type daemon struct {
	cmd  *exec.Cmd
	addr string
	log  *bytes.Buffer
	done chan error
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startDaemon writes a config directory serving base and runs
// `dnbd3-server -n -c DIR`.
func startDaemon(t *testing.T, base string) *daemon {
	t.Helper()
	return startDaemonWith(t, base, "", nil)
}

// startDaemonWith is startDaemon with extra lines in server.conf's
// [dnbd3] section and extra files (name -> content, alt-servers) in the
// config directory.
func startDaemonWith(t *testing.T, base, extra string, files map[string]string) *daemon {
	t.Helper()
	port := freePort(t)
	conf := fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n%s[logging]\nconsoleMask=ERROR WARNING MINOR INFO DEBUG1\n", base, port, extra)
	if files == nil {
		files = map[string]string{}
	}
	return runServerBinary(t, confDir(t, conf, files), port)
}

// runServerBinary runs `dnbd3-server -n -c etc -b 127.0.0.1 args...`, whose
// config listens on port, and waits until it does. The server is killed
// when the test ends; its log is shown if the test failed.
func runServerBinary(t *testing.T, etc string, port int, args ...string) *daemon {
	t.Helper()
	d := &daemon{addr: fmt.Sprintf("127.0.0.1:%d", port), log: &bytes.Buffer{}, done: make(chan error, 1)}
	d.cmd = exec.Command(bin("dnbd3-server"), append([]string{"-n", "-c", etc, "-b", "127.0.0.1"}, args...)...)
	d.cmd.Stdout, d.cmd.Stderr = syncWriter(d.log), syncWriter(d.log)
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
		if t.Failed() {
			t.Logf("dnbd3-server log:\n%s", d.logText())
		}
	})
	if err := testutil.WaitListening(d.addr, 10*time.Second); err != nil {
		t.Fatalf("dnbd3-server did not listen on %s: %v\n%s", d.addr, err, d.logText())
	}
	return d
}

func (d *daemon) logText() string {
	logMu.Lock()
	defer logMu.Unlock()
	return d.log.String()
}

// waitLog waits until the server's log contains s.
func (d *daemon) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(d.logText(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log never showed %q:\n%s", s, d.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemon) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

func (d *daemon) query(t *testing.T, q string) map[string]any {
	t.Helper()
	resp, err := http.Get("http://" + d.addr + "/query?q=" + q)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func run(t *testing.T, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(bin(name), args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = cmd.ProcessState.ExitCode()
	if err != nil && code < 0 {
		t.Fatalf("%s: %v", name, err)
	}
	return o.String(), e.String(), code
}

// TestServerBinaryLifecycle drives dnbd3-server like an administrator:
// get an image, query the RPC, reload with SIGHUP, verify with SIGUSR1,
// stop with SIGTERM.
func TestServerBinaryLifecycle(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "lab", "win.img.r1"), 24<<20)
	d := startDaemon(t, base)

	out := filepath.Join(t.TempDir(), "copy.img")
	_, stderr, code := run(t, "dnbd3-nbd", "get", "-h", d.addr, "-i", "lab/win.img", "-o", out)
	if code != 0 {
		t.Fatalf("dnbd3-nbd get: exit %d: %s", code, stderr)
	}
	if testutil.SHA256File(t, out) != testutil.SHA256File(t, filepath.Join(base, "lab", "win.img.r1")) {
		t.Fatal("downloaded image differs")
	}
	if st := d.query(t, "stats"); st["bytesSent"].(float64) != 24<<20 {
		t.Errorf("bytesSent = %v", st["bytesSent"])
	}

	// SIGHUP: a new revision appears in the image list
	randomImage(t, filepath.Join(base, "lab", "win.img.r2"), 8<<20)
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, "reloaded")
	imgs := d.query(t, "images")["images"].([]any)
	if len(imgs) != 2 {
		t.Fatalf("after SIGHUP: %v", imgs)
	}

	// SIGUSR1 verifies CRC lists: corrupt an image that has one
	img := filepath.Join(base, "crc.r1")
	randomImage(t, img, 20<<20)
	if _, stderr, code := run(t, "dnbd3-server", "--crc", img); code != 0 {
		t.Fatalf("--crc: %s", stderr)
	}
	if _, _, code := run(t, "dnbd3-server", "--crc", img); code != 1 {
		t.Errorf("--crc over an existing .crc: exit %d, want 1", code)
	}
	f, _ := os.OpenFile(img, os.O_WRONLY, 0)
	f.WriteAt([]byte{0xff, 0xfe}, 17<<20) // hash block 1
	f.Close()
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, "image=crc:1")
	d.signal(t, syscall.SIGUSR1)
	d.waitLog(t, "Hash check for block 1 of crc failed")
	d.waitLog(t, "checksum verification done")
	if strings.Contains(d.logText(), "Hash check for block 0 of crc failed") {
		t.Error("block 0 reported although it is intact")
	}

	// SIGTERM: clean exit
	d.signal(t, syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
		d.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("no exit within 10 s of SIGTERM")
	}
	if !strings.Contains(d.logText(), "shut down cleanly") {
		t.Errorf("log lacks the shutdown line:\n%s", d.logText())
	}
}

// TestGetSurvivesServerKill downloads from two server processes and
// SIGKILLs the one in use during the download.
func TestGetSurvivesServerKill(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "big.r1"), 192<<20)
	a := startDaemon(t, base)
	b := startDaemon(t, base)
	out := filepath.Join(t.TempDir(), "copy.img")
	cmd := exec.Command(bin("dnbd3-nbd"), "get", "-h", a.addr+" "+b.addr, "-S", "-i", "big", "-o", out, "--parallel", "2", "--block-size", "256K")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// wait until the first server sends data, then kill it
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st := a.query(t, "stats"); st["bytesSent"].(float64) > 8<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("server a never sent data")
		}
		time.Sleep(5 * time.Millisecond)
	}
	a.cmd.Process.Signal(syscall.SIGKILL)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("get failed after the server was killed: %v\n%s", err, stderr.String())
	}
	if testutil.SHA256File(t, out) != testutil.SHA256File(t, filepath.Join(base, "big.r1")) {
		t.Fatal("downloaded image differs")
	}
	if sent := b.query(t, "stats")["bytesSent"].(float64); sent == 0 {
		t.Error("server b sent nothing: the failover did not happen mid-download")
	}
}

func TestServerOneShotsAndBadInput(t *testing.T) {
	base := t.TempDir()
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nsparseFiles=true\n"), 0o644)
	_, stderr, code := run(t, "dnbd3-server", "-c", etc, "--create", "new/img", "--revision", "1", "--size", "100000")
	if code != 0 {
		t.Fatalf("--create: %s", stderr)
	}
	if st, err := os.Stat(filepath.Join(base, "new", "img.r1")); err != nil || st.Size() != 102400 {
		t.Fatalf("created image: %v %v", st, err)
	}
	if m, err := os.ReadFile(filepath.Join(base, "new", "img.r1.map")); err != nil || !bytes.Equal(m, make([]byte, 4)) {
		t.Fatalf("created map: %x %v", m, err)
	}
	if _, _, code := run(t, "dnbd3-server", "-c", etc, "--create", "new/img", "--revision", "1", "--size", "1"); code != 1 {
		t.Errorf("--create over an existing image: exit %d", code)
	}
	if _, stderr, code := run(t, "dnbd3-server", "--no-such-flag"); code != 2 || !strings.Contains(stderr, "no-such-flag") {
		t.Errorf("bad flag: exit %d %q", code, stderr)
	}
	empty := t.TempDir()
	os.WriteFile(filepath.Join(empty, "server.conf"), []byte("[dnbd3]\nlistenPort=5003\n"), 0o644)
	if _, stderr, code := run(t, "dnbd3-server", "-n", "-c", empty); code != 1 || !strings.Contains(stderr, "basePath") {
		t.Errorf("missing basePath: exit %d %q", code, stderr)
	}
	if _, stderr, code := run(t, "dnbd3-server", "-n", "-c", "/nonexistent/dir"); code != 1 || !strings.Contains(stderr, "/nonexistent/dir") {
		t.Errorf("missing config dir: exit %d %q", code, stderr)
	}
}

// TestBenchAgainstServer runs both dnbd3-bench modes against the binary.
func TestBenchAgainstServer(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "b.r1"), 16<<20)
	d := startDaemon(t, base)
	out, stderr, code := run(t, "dnbd3-bench", "-h", d.addr, "-i", "b", "-n", "200", "-t", "4")
	if code != 0 || !strings.Contains(out, "Summary: Attempts: 800, Success: 800, Fails: 0") {
		t.Fatalf("handshake mode: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = run(t, "dnbd3-bench", "-h", d.addr, "-i", "b", "--duration", "1s", "--queue-depth", "16", "-b", "64K", "--pattern", "rand")
	if code != 0 || !strings.Contains(out, " 0 errors") {
		t.Fatalf("load mode: exit %d\n%s%s", code, out, stderr)
	}
}
