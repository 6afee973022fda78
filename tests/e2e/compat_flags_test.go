package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// serveProc is a running `dnbd3-nbd serve` with everything it printed.
type serveProc struct {
	cmd    *exec.Cmd
	sock   string
	stdout strings.Builder // after the address line
	stderr strings.Builder
	done   chan error
}

func (p *serveProc) out() string {
	logMu.Lock()
	defer logMu.Unlock()
	return p.stdout.String()
}

func (p *serveProc) errText() string {
	logMu.Lock()
	defer logMu.Unlock()
	return p.stderr.String()
}

// startServeProc runs `dnbd3-nbd serve ARGS --listen unix:SOCK` and waits
// for the address line.
func startServeProc(t *testing.T, args ...string) *serveProc {
	t.Helper()
	p := &serveProc{sock: filepath.Join(t.TempDir(), "nbd.sock"), done: make(chan error, 1)}
	p.cmd = exec.Command(bin("dnbd3-nbd"), append(append([]string{"serve"}, args...), "--listen", "unix:"+p.sock)...)
	stdout, _ := p.cmd.StdoutPipe()
	p.cmd.Stderr = syncWriter(&p.stderr)
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("serve stderr:\n%s\nstdout:\n%s", p.errText(), p.out())
		}
	})
	br := bufio.NewReader(stdout)
	line, err := br.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != p.sock {
		t.Fatalf("serve printed %q (%v), want %s:\n%s", line, err, p.sock, p.errText())
	}
	go io.Copy(syncWriter(&p.stdout), br)
	return p
}

// stop sends SIGINT and waits for a clean exit.
func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-p.done:
		p.done <- err // for Cleanup
		if err != nil {
			t.Fatalf("serve exited with %v:\n%s", err, p.errText())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("serve did not stop within 20 s of SIGINT:\n%s", p.errText())
	}
}

// TestReferenceFlagNames runs `dnbd3-nbd serve` (the same image and COW
// flags as attach) with the reference FUSE client's long names: --loadcow,
// --cowServer, --cowStatStdout, --cowStatFile, --merge, -d. The session
// loads, the status goes to stdout as the reference's INI text (no log
// lines), the status file is written, the merge is requested and the log
// has debug lines.
func TestReferenceFlagNames(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "ref.r1"), 1<<20)
	d := startDaemon(t, base)
	m := mergertest.Start(t)
	sess := t.TempDir()

	first := startServeProc(t, "-h", d.addr, "-i", "ref", "-c", sess, "-C", m.Addr)
	first.stop(t)
	p := startServeProc(t, "--host", d.addr, "--image", "ref", "--loadcow", sess, "--cowServer", m.Addr,
		"--cowStatStdout", "--cowStatFile", "--merge", "-d", "--upload-delay", "0")
	p.stop(t)
	out := p.out()
	if !strings.HasPrefix(out, "[General]\nuuid=") || !strings.Contains(out, "\nstate=done\n") || strings.Contains(out, "level=") {
		t.Errorf("--cowStatStdout printed:\n%s", out)
	}
	if st, err := os.ReadFile(filepath.Join(sess, "status")); err != nil || !strings.Contains(string(st), "state=done") {
		t.Errorf("--cowStatFile: %q %v", st, err)
	}
	uuids := m.Sessions()
	if len(uuids) != 1 {
		t.Fatalf("merger sessions %v: --loadcow did not continue the session", uuids)
	}
	if s, _ := m.Session(uuids[0]); len(s.Merges) != 1 {
		t.Errorf("--merge: %d merge requests", len(s.Merges))
	}
	if !strings.Contains(p.errText(), "level=DEBUG") {
		t.Errorf("-d: no debug lines in the log:\n%s", p.errText())
	}
	for _, args := range [][]string{{"serve", "-v"}, {"attach", "--version"}} {
		if stdout, _, code := run(t, "dnbd3-nbd", args...); code != 0 || !strings.HasPrefix(stdout, "dnbd3go ") {
			t.Errorf("%v: exit %d, %q", args, code, stdout)
		}
	}
	if _, stderr, code := run(t, "dnbd3-nbd", "attach", "-i", "ref", "-h"); code != 2 || !strings.Contains(stderr, "--help for help") {
		t.Errorf("attach -h without a value: exit %d, %q", code, stderr)
	}
}

// TestServeStatusAndServers: status and servers work for a serve export
// by its socket path; servers add/switch/remove change where it reads
// from while a reader checks every byte.
func TestServeStatusAndServers(t *testing.T) {
	base := t.TempDir()
	data := randomImage(t, filepath.Join(base, "sv.r1"), 2<<20)
	a := startDaemon(t, base)
	b := startDaemon(t, base)
	p := startServeProc(t, "-h", a.addr, "-i", "sv", "-S")

	stdout, stderr, code := run(t, "dnbd3-nbd", "status", p.sock)
	if code != 0 || !strings.Contains(stdout, "export:     unix:"+p.sock) || !strings.Contains(stdout, "image:      sv rid 1") {
		t.Fatalf("status %s: exit %d\n%s%s", p.sock, code, stdout, stderr)
	}
	steps := []struct{ args, want, current string }{
		{"add " + b.addr, "added: " + b.addr, a.addr},
		{"switch " + b.addr, "switched to: " + b.addr, b.addr},
		{"remove " + a.addr, "removed: " + a.addr, b.addr},
		{"auto", "RTT probing chooses the server again", b.addr},
	}
	for _, s := range steps {
		out, errOut, code := run(t, "dnbd3-nbd", append([]string{"servers", "unix:" + p.sock}, strings.Fields(s.args)...)...)
		if code != 0 || !strings.Contains(out, s.want) {
			t.Fatalf("servers %s: exit %d\n%s%s", s.args, code, out, errOut)
		}
		js, _, _ := run(t, "dnbd3-nbd", "status", p.sock, "--json")
		var st struct {
			Listen string
			Client struct{ Current, Pinned string }
		}
		if err := json.Unmarshal([]byte(js), &st); err != nil || st.Client.Current != s.current {
			t.Fatalf("after servers %s: current %q (want %s), %v\n%s", s.args, st.Client.Current, s.current, err, js)
		}
		if got, ok := readExport(t, p.sock); ok && string(got) != string(data) {
			t.Fatalf("after servers %s: the export's data differs", s.args)
		}
	}
	list, _, _ := run(t, "dnbd3-nbd", "servers", p.sock)
	if lines := strings.Split(strings.TrimSpace(list), "\n"); len(lines) != 2 || !strings.Contains(lines[1], b.addr) || !strings.Contains(lines[1], "added") {
		t.Errorf("servers %s:\n%s", p.sock, list)
	}
	if out, _, code := run(t, "dnbd3-nbd", "servers", p.sock, "remove", b.addr); code != 1 {
		t.Errorf("removing the only server: exit %d\n%s", code, out)
	}
	p.stop(t)
	if _, err := os.Stat(p.sock + ".ctl"); err == nil {
		t.Error("the control socket outlived serve")
	}
	if _, stderr, code := run(t, "dnbd3-nbd", "status", p.sock); code == 0 {
		t.Errorf("status of a stopped export: exit 0, %q", stderr)
	}
}

// readExport reads the whole export on sock with nbdcopy; ok is false
// (and the test says SKIP for the data check) without nbdcopy.
func readExport(t *testing.T, sock string) (data []byte, ok bool) {
	t.Helper()
	if _, err := exec.LookPath("nbdcopy"); err != nil {
		t.Log("SKIP the data check: nbdcopy not installed (package libnbd-bin)")
		return nil, false
	}
	dst := filepath.Join(t.TempDir(), "export.img")
	if out, err := exec.Command("nbdcopy", "nbd+unix:///?socket="+sock, dst).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	return b, true
}

// TestImagesCommand lists a server's images from its RPC, as a table and
// as JSON, and reports an rpc.acl refusal clearly.
func TestImagesCommand(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "lab", "win.img.r3"), 3<<20)
	randomImage(t, filepath.Join(base, "tiny.r1"), 5000)
	d := startDaemon(t, base)
	stdout, stderr, code := run(t, "dnbd3-nbd", "images", "-h", d.addr)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") {
		t.Fatalf("images: exit %d\n%s%s", code, stdout, stderr)
	}
	for _, want := range [][]string{{"lab/win.img", "3", "3.0 MiB", "3145728", "100%"}, {"tiny", "1", "8192", "100%"}} {
		found := false
		for _, l := range lines[1:] {
			if f := strings.Fields(l); len(f) > 0 && f[0] == want[0] {
				found = true
				for _, w := range want[1:] {
					if !strings.Contains(l, " "+w) {
						t.Errorf("images: line %q lacks %q", l, w)
					}
				}
			}
		}
		if !found {
			t.Errorf("images: %s missing:\n%s", want[0], stdout)
		}
	}
	js, _, code := run(t, "dnbd3-nbd", "images", "-h", d.addr, "--json")
	var imgs []struct {
		Name     string
		RID      int
		Size     int64
		Complete int
	}
	if err := json.Unmarshal([]byte(js), &imgs); err != nil || code != 0 || len(imgs) != 2 {
		t.Fatalf("images --json: exit %d, %v\n%s", code, err, js)
	}

	// An rpc.acl that only lets another network list images.
	port := freePort(t)
	etc := confDir(t, fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n", base, port), map[string]string{"rpc.acl": "10.0.0.0/8 ALL\n127.0.0.1 STATS\n"})
	srv := exec.Command(bin("dnbd3-server"), "-n", "-c", etc, "-b", "127.0.0.1")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	_, stderr, code = run(t, "dnbd3-nbd", "images", "-h", addr)
	if code != 1 || !strings.Contains(stderr, "rpc.acl refuses this host the image list") || !strings.Contains(stderr, "IMAGE_LIST") {
		t.Errorf("images refused by rpc.acl: exit %d, %q", code, stderr)
	}
	_, stderr, code = run(t, "dnbd3-nbd", "images", "-h", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--timeout", "2s")
	if code != 1 || !strings.Contains(stderr, "is a dnbd3-server listening there?") {
		t.Errorf("images of nothing: exit %d, %q", code, stderr)
	}
}

// TestEveryBinaryHelpAndVersion: every binary prints --help on stdout
// with exit 0 and nothing on stderr, and has --version.
func TestEveryBinaryHelpAndVersion(t *testing.T) {
	for _, name := range []string{"dnbd3-server", "dnbd3-nbd", "dnbd3-merger", "dnbd3-bench", "dnbd3-cowtest"} {
		stdout, stderr, code := run(t, name, "--help")
		if code != 0 || !strings.Contains(stdout, "Usage") || stderr != "" {
			t.Errorf("%s --help: exit %d, stdout %d bytes, stderr %q", name, code, len(stdout), stderr)
		}
		stdout, stderr, code = run(t, name, "--version")
		if code != 0 || !strings.HasPrefix(stdout, "dnbd3go ") || stderr != "" {
			t.Errorf("%s --version: exit %d, stdout %q, stderr %q", name, code, stdout, stderr)
		}
	}
	if _, stderr, code := run(t, "dnbd3-bench", "-i", "img", "-h"); code != 2 || !strings.Contains(stderr, "--help for help") {
		t.Errorf("dnbd3-bench -h without a value: exit %d, %q", code, stderr)
	}
}
