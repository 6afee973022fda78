package kernel

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

// These tests drive the real binaries (dnbd3-server, dnbd3-nbd) inside
// the VM as an administrator would.

// proc is a started command with its combined output collected.
type proc struct {
	cmd  *exec.Cmd
	out  testutil.Buffer
	done chan error
}

func (p *proc) output() string { return p.out.String() }

// wait waits for the process to exit and returns its exit code (-1 on
// timeout).
func (p *proc) wait(d time.Duration) int {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		return -1
	}
}

func start(t *testing.T, stdout io.Writer, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), done: make(chan error, 1)}
	p.cmd.Stderr = &p.out
	p.cmd.Stdout = &p.out
	if stdout != nil {
		p.cmd.Stdout = stdout
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(name), p.output())
		}
	})
	return p
}

var nextPort atomic.Int32

// server starts dnbd3-server serving base on a fresh loopback port.
func server(t *testing.T, base string) (*proc, string) {
	t.Helper()
	return serverWith(t, base, "", "")
}

// serverWith starts dnbd3-server serving base on a fresh loopback port,
// with extra lines in the [dnbd3] section of server.conf and, if not
// empty, an alt-servers file.
func serverWith(t *testing.T, base, extra, altServers string) (*proc, string) {
	t.Helper()
	port := 16000 + int(nextPort.Add(1))
	etc := t.TempDir()
	conf := fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n%s", base, port, extra)
	if err := os.WriteFile(filepath.Join(etc, "server.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if altServers != "" {
		if err := os.WriteFile(filepath.Join(etc, "alt-servers"), []byte(altServers), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	p := start(t, nil, "dnbd3-server", "-n", "-c", etc, "-b", "127.0.0.1")
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
		t.Fatalf("dnbd3-server does not listen: %v\n%s", err, p.output())
	}
	return p, addr
}

// attachCmd runs `dnbd3-nbd attach ARGS` and returns once it printed the
// device path. Cleanup stops it and makes sure no device stays connected.
func attachCmd(t *testing.T, args ...string) (*proc, string, int) {
	t.Helper()
	pr, pw := io.Pipe()
	p := start(t, pw, "dnbd3-nbd", append([]string{"attach"}, args...)...)
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(pr).ReadString('\n')
		lines <- strings.TrimSpace(line)
		io.Copy(&p.out, pr)
	}()
	var dev string
	select {
	case dev = <-lines:
	case <-p.done:
		t.Fatalf("attach exited before printing a device:\n%s", p.output())
	case <-time.After(60 * time.Second):
		// SIGQUIT makes the Go runtime print every goroutine's stack:
		// the output then shows where the daemon is stuck.
		p.cmd.Process.Signal(syscall.SIGQUIT)
		p.wait(5 * time.Second)
		t.Fatalf("attach printed no device within 60 s (goroutine dump after SIGQUIT below):\n%s", p.output())
	}
	idx, err := nbdbridge.ParseDevice(dev)
	if err != nil {
		t.Fatalf("attach printed %q: %v\n%s", dev, err, p.output())
	}
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		p.wait(20 * time.Second)
		pw.Close()
		if connected(t, idx) {
			exec.Command("umount", "-l", "/mnt/"+filepath.Base(dev)).Run()
			nbdbridge.Disconnect(idx)
		}
		nbdbridge.RemoveState(idx)
	})
	return p, dev, idx
}

// genImage writes a deterministic image: random 1 MiB, each 4 KiB block
// stamped with its offset so misplaced blocks are caught.
func genImage(t *testing.T, path string, size int64) string {
	t.Helper()
	os.MkdirAll(filepath.Dir(path), 0o755)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 1<<20)
	for i := range block {
		block[i] = byte(i*131 + i/7)
	}
	h := sha256.New()
	w := io.MultiWriter(f, h)
	for off := int64(0); off < size; off += int64(len(block)) {
		for b := 0; b < len(block); b += 4096 {
			copy(block[b:], fmt.Sprintf("%016x", off+int64(b)))
		}
		n := min(int64(len(block)), size-off)
		if _, err := w.Write(block[:n]); err != nil {
			t.Fatal(err)
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// readDevice reads a device fully (1 MiB reads, through the page cache),
// calling progress with the bytes read so far.
func readDevice(dev string, progress func(int64)) (string, error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var total int64
	for {
		n, err := f.Read(buf)
		h.Write(buf[:n])
		total += int64(n)
		if progress != nil {
			progress(total)
		}
		if err == io.EOF {
			return hex.EncodeToString(h.Sum(nil)), nil
		}
		if err != nil {
			return "", fmt.Errorf("after %d bytes: %w", total, err)
		}
	}
}

func dropCaches() { os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) }

// servingServer returns the server the device reads from now: the one its
// kernel-direct connections go to, else the client library's current one.
func servingServer(t *testing.T, dev string) string {
	t.Helper()
	st := statusJSON(t, dev)
	if sl, ok := st["slots"].(map[string]any); ok && sl["mode"] == "direct" {
		return sl["directServer"].(string)
	}
	return st["client"].(map[string]any)["Current"].(string)
}

func nbd(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command("dnbd3-nbd", args...).CombinedOutput()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

// readManifest returns the checksums of the files in /testdata/images/fs.r1
// by path (vm/testdata.sh writes them to /testdata/fs.manifest); without
// the file the test skips.
func readManifest(t *testing.T) map[string]string {
	t.Helper()
	manifest, err := os.ReadFile("/testdata/fs.manifest")
	if err != nil {
		t.Skipf("SKIP: /testdata/fs.manifest missing (run the harness with -files from vm/testdata.sh): %v", err)
	}
	sums := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(manifest)), "\n") {
		sum, path, _ := strings.Cut(line, "  ")
		sums[path] = sum
	}
	return sums
}

func statusJSON(t *testing.T, dev string) map[string]any {
	t.Helper()
	out, code := nbd(t, "status", dev, "--json")
	var v map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &v) != nil {
		t.Fatalf("status %s --json: exit %d\n%s", dev, code, out)
	}
	return v
}

// TestAttachReadFull attaches a 256 MiB image served by dnbd3-server,
// reads the whole device and compares checksums; then checks list and
// status, detaches and checks that nothing stays connected.
func TestAttachReadFull(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "lab", "big.r1"), 256<<20)
	_, addr := server(t, base)
	p, dev, idx := attachCmd(t, "-h", addr, "-i", "lab/big")
	if sz, _ := nbdbridge.DeviceSize(idx); sz != 256<<20 {
		t.Fatalf("%s size %d", dev, sz)
	}
	start := time.Now()
	got, err := readDevice(dev, nil)
	if err != nil {
		t.Fatalf("reading %s: %v", dev, err)
	}
	if got != want {
		t.Fatalf("sha256 of %s = %s, image %s", dev, got, want)
	}
	t.Logf("read 256 MiB from %s in %v, sha256 matches", dev, time.Since(start).Round(time.Millisecond))
	if ro, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/ro", idx)); err != nil || strings.TrimSpace(string(ro)) != "1" {
		t.Errorf("device not read-only: %q %v", ro, err)
	}
	out, _ := nbd(t, "list")
	if !strings.Contains(out, dev) || !strings.Contains(out, "lab/big") || !strings.Contains(out, addr) || !strings.Contains(out, "serving") {
		t.Errorf("list:\n%s", out)
	}
	t.Logf("list:\n%s", out)
	st := statusJSON(t, dev)
	if st["image"] != "lab/big" || st["rid"].(float64) != 1 {
		t.Errorf("status: %v", st)
	}

	out, code := nbd(t, "detach", dev)
	if code != 0 {
		t.Fatalf("detach: %d %s", code, out)
	}
	if c := p.wait(20 * time.Second); c != 0 {
		t.Fatalf("attach exited %d after detach", c)
	}
	if connected(t, idx) {
		t.Fatal("still connected after detach")
	}
	if out, _ := nbd(t, "list"); strings.Contains(out, dev) {
		t.Fatalf("list after detach:\n%s", out)
	}
	if _, code := nbd(t, "status", dev); code != 3 {
		t.Errorf("status of a detached device: exit %d, want 3", code)
	}
}

// TestAttachExt4ReadOnly mounts an ext4 image prepared on the host (mke2fs
// -d, see vm/testdata.sh) from a read-only attach and verifies its files.
func TestAttachExt4ReadOnly(t *testing.T) {
	requireNBD(t)
	sums := readManifest(t)
	_, addr := server(t, "/testdata/images")
	p, dev, idx := attachCmd(t, "-h", addr, "-i", "fs")
	mnt := mountDev(t, dev, "-o", "ro,noload")
	verifyTree(t, mnt, sums)
	t.Logf("%d files verified on %s", len(sums), mnt)
	if busy, _ := nbdbridge.InUse(idx); !busy {
		t.Error("InUse false while mounted")
	}
	// SIGTERM while mounted: the device stays for a successor.
	p.cmd.Process.Signal(syscall.SIGTERM)
	if c := p.wait(20 * time.Second); c != 0 {
		t.Fatalf("attach exited %d after SIGTERM", c)
	}
	if !strings.Contains(p.output(), "leaving it attached") || !connected(t, idx) {
		t.Fatalf("mounted device was not left attached:\n%s", p.output())
	}
	// the successor takes it over; the mount keeps working
	_, dev2, _ := attachCmd(t, "-h", addr, "-i", "fs")
	if dev2 != dev {
		t.Fatalf("successor attached %s, want %s", dev2, dev)
	}
	dropCaches()
	if data, err := os.ReadFile(filepath.Join(mnt, "hello.txt")); err != nil || !strings.HasPrefix(string(data), "hello") {
		t.Fatalf("read after takeover: %q %v", data, err)
	}
	umount(t, mnt)
}

// TestFailoverDuringRead kills the serving dnbd3-server during a full read
// of the device: the read completes with the right data and no I/O error.
func TestFailoverDuringRead(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "fo.r1"), 192<<20)
	a, addrA := server(t, base)
	b, addrB := server(t, base)
	_, dev, _ := attachCmd(t, "-h", addrA+" "+addrB, "-S", "-i", "fo", "--timeout", "60s")
	// The server to kill is chosen when the read is under way: RTT probing
	// may switch to the other server right after the attach.
	var cur string
	var killed atomic.Bool
	got, err := readDevice(dev, func(n int64) {
		if n > 64<<20 && !killed.Swap(true) {
			cur = servingServer(t, dev)
			victim := map[string]*proc{addrA: a, addrB: b}[cur]
			if victim == nil {
				t.Fatalf("serving server %q is neither %s nor %s", cur, addrA, addrB)
			}
			victim.cmd.Process.Signal(syscall.SIGKILL)
		}
	})
	if err != nil {
		t.Fatalf("read failed across the failover: %v", err)
	}
	if got != want {
		t.Fatal("data read across the failover differs")
	}
	now := statusJSON(t, dev)["client"].(map[string]any)
	if now["Current"] == cur || now["Failovers"].(float64) < 1 {
		t.Fatalf("no failover recorded: was %s, now %v", cur, now)
	}
	t.Logf("killed %s at 64 MiB, read completed on %s (failovers %v)", cur, now["Current"], now["Failovers"])
}

// TestDaemonKilledWhileReading SIGKILLs the daemon while a reader waits on
// the device; a restarted attach takes the same device over with
// RECONFIGURE and the reader completes.
func TestDaemonKilledWhileReading(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "k.r1"), 64<<20)
	srv, addr := server(t, base)
	p, dev, idx := attachCmd(t, "-h", addr, "-i", "k", "--timeout", "5s")

	// Freeze the server so the next read hangs inside the daemon.
	srv.cmd.Process.Signal(syscall.SIGSTOP)
	defer srv.cmd.Process.Signal(syscall.SIGCONT)
	type result struct {
		data []byte
		err  error
	}
	res := make(chan result, 1)
	go func() {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			res <- result{err: err}
			return
		}
		defer f.Close()
		buf := testutil.AlignedBuf(t, 1<<20)
		_, err = f.ReadAt(buf, 40<<20)
		res <- result{append([]byte(nil), buf...), err}
	}()
	time.Sleep(500 * time.Millisecond)
	select {
	case r := <-res:
		t.Fatalf("read finished while the server was stopped: %v", r.err)
	default:
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(10 * time.Second)
	srv.cmd.Process.Signal(syscall.SIGCONT)
	if !connected(t, idx) {
		t.Fatal("device disconnected when its daemon died")
	}
	start := time.Now()
	p2, dev2, _ := attachCmd(t, "-h", addr, "-i", "k", "--timeout", "5s")
	if dev2 != dev || !strings.Contains(p2.output(), "took over") {
		t.Fatalf("restarted attach got %s (want %s):\n%s", dev2, dev, p2.output())
	}
	select {
	case r := <-res:
		if r.err != nil {
			t.Fatalf("waiting read failed: %v", r.err)
		}
		if want := fmt.Sprintf("%016x", 40<<20); string(r.data[:16]) != want {
			t.Fatalf("waiting read returned block %q, want %q", r.data[:16], want)
		}
		t.Logf("waiting read completed %v after the restart", time.Since(start).Round(time.Millisecond))
	case <-time.After(60 * time.Second):
		t.Fatal("waiting read did not complete within 60 s of the restart")
	}
}

// TestAttachBadInput checks the errors an admin gets for bad input: each a
// clear message, a non-zero exit code and no device left connected.
func TestAttachBadInput(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "ok.r1"), 8<<20)
	_, addr := server(t, base)
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown image", []string{"-h", addr, "-i", "nope"}, 1, "not found"},
		{"unknown rid", []string{"-h", addr, "-i", "ok", "-r", "9"}, 1, "not found"},
		{"unreachable", []string{"-h", "127.0.0.1:1", "-i", "ok"}, 1, "refused"},
		{"no such device", []string{"-h", addr, "-i", "ok", "--device", "/dev/nbd99"}, 1, "no such device"},
		{"not an nbd device", []string{"-h", addr, "-i", "ok", "--device", "/dev/sda"}, 2, "nbd"},
		{"bad block size", []string{"-h", addr, "-i", "ok", "--block-size", "1000"}, 2, "512 or 4096"},
		{"missing image", []string{"-h", addr}, 2, "-i IMAGE"},
	}
	for _, c := range cases {
		start := time.Now()
		out, code := nbd(t, append([]string{"attach"}, c.args...)...)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d (want %d), output:\n%s", c.name, code, c.code, out)
		}
		if d := time.Since(start); d > 15*time.Second {
			t.Errorf("%s: took %v", c.name, d)
		}
	}
	// a device that is already attached
	_, dev, _ := attachCmd(t, "-h", addr, "-i", "ok")
	other := filepath.Join(base, "ok2.r1")
	genImage(t, other, 4<<20)
	out, code := nbd(t, "attach", "-h", addr, "-i", "ok2", "--device", dev)
	if code != 1 || !strings.Contains(out, "in use") {
		t.Errorf("attach to a busy device: exit %d\n%s", code, out)
	}
	// not root
	cmd := exec.Command("dnbd3-nbd", "attach", "-h", addr, "-i", "ok")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	b, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(b), "root") {
		t.Errorf("as nobody: exit %d\n%s", cmd.ProcessState.ExitCode(), b)
	}
	// nothing but the one good attach is connected
	st, err := nbdbridge.Status(-1)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range st {
		if s.Connected {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d devices connected after the bad attaches, want 1", n)
	}
}

// TestSIGTERMWhileOpen: a device that another process holds open (not
// mounted) is left attached on SIGTERM and taken over by a successor;
// with --force SIGTERM disconnects it anyway.
func TestSIGTERMWhileOpen(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "o.r1"), 8<<20)
	_, addr := server(t, base)

	p, dev, idx := attachCmd(t, "-h", addr, "-i", "o")
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if c := p.wait(20 * time.Second); c != 0 || !strings.Contains(p.output(), "leaving it attached") {
		t.Fatalf("exit %d; open device not left attached:\n%s", c, p.output())
	}
	if !connected(t, idx) {
		t.Fatal("device disconnected although open")
	}
	f.Close()
	p2, dev2, _ := attachCmd(t, "-h", addr, "-i", "o")
	if dev2 != dev {
		t.Fatalf("successor got %s, want %s", dev2, dev)
	}
	p2.cmd.Process.Signal(syscall.SIGTERM)
	if c := p2.wait(20 * time.Second); c != 0 || connected(t, idx) {
		t.Fatalf("idle device after SIGTERM: exit %d, connected %v\n%s", c, connected(t, idx), p2.output())
	}

	p3, dev3, idx3 := attachCmd(t, "-h", addr, "-i", "o", "--force")
	f3, err := os.OpenFile(dev3, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	p3.cmd.Process.Signal(syscall.SIGTERM)
	if c := p3.wait(20 * time.Second); c != 0 || !strings.Contains(p3.output(), "detached") {
		t.Fatalf("--force: exit %d\n%s", c, p3.output())
	}
	// The opener keeps the kernel's config reference (STATUS says connected
	// until the last close), but its I/O now fails.
	dropCaches()
	if _, err := f3.ReadAt(testutil.AlignedBuf(t, 4096), 1<<20); err == nil {
		t.Error("read on a force-disconnected device succeeded")
	}
	f3.Close()
	deadline := time.Now().Add(5 * time.Second)
	for connected(t, idx3) {
		if time.Now().After(deadline) {
			t.Fatal("still connected after the last opener closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
