package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/sdnotify/sdnotifytest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// journalEnv returns a file to use as a daemon's stdout and stderr and the
// environment systemd would give a Type=notify service whose output goes
// to the journal: NOTIFY_SOCKET and JOURNAL_STREAM naming that file.
func journalEnv(t *testing.T, sock *sdnotifytest.Socket) (*os.File, []string) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return f, append(os.Environ(), "NOTIFY_SOCKET="+sock.Path, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
}

// checkJournalLines asserts that every line of the daemon's output has a
// syslog priority prefix and no timestamp of its own, and that want (a
// "<N>level=..." start) occurs.
func checkJournalLines(t *testing.T, f *os.File, want ...string) {
	t.Helper()
	out, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	text := string(out)
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		if len(l) < 3 || l[0] != '<' || l[2] != '>' || l[1] < '0' || l[1] > '7' || strings.Contains(l, "time=") {
			t.Errorf("line %q: want a <N> priority prefix and no time=", l)
		}
	}
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("output lacks %q:\n%s", w, text)
		}
	}
}

// waitExit waits for cmd to exit after SIGTERM and returns its exit code.
func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("no exit within 30 s of SIGTERM")
	}
	return cmd.ProcessState.ExitCode()
}

// TestServerSystemdNotify runs dnbd3-server as systemd would run the
// packaged Type=notify unit: READY=1 with a STATUS= line once it listens,
// STOPPING=1 on SIGTERM, journal-style log lines.
func TestServerSystemdNotify(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "a.r1"), 1<<20)
	randomImage(t, filepath.Join(base, "b.r2"), 1<<20)
	port := freePort(t)
	etc := confDir(t, fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n[logging]\nconsoleMask=ERROR WARNING MINOR INFO\n", base, port), map[string]string{})
	systemdLifecycle(t, exec.Command(bin("dnbd3-server"), "-n", "-c", etc, "-b", "127.0.0.1"), port,
		"READY=1\nSTATUS=serving 2 images, 0 clients", "<6>level=INFO msg=listening", "<6>level=INFO msg=\"shut down cleanly\"")
}

// TestMergerSystemdNotify does the same for dnbd3-merger.
func TestMergerSystemdNotify(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"work", "images"} {
		os.Mkdir(filepath.Join(root, d), 0o755)
	}
	port := freePort(t)
	settings := filepath.Join(root, "appsettings.json")
	js := fmt.Sprintf(`{"Settings": {"WorkingDirectory": %q, "OriginalImageDirectory": %q, "DestinationDirectory": %q}, "Urls": "http://127.0.0.1:%d"}`,
		filepath.Join(root, "work"), filepath.Join(root, "images"), filepath.Join(root, "images"), port)
	if err := os.WriteFile(settings, []byte(js), 0o644); err != nil {
		t.Fatal(err)
	}
	systemdLifecycle(t, exec.Command(bin("dnbd3-merger"), "--settings", settings), port,
		"READY=1\nSTATUS=0 sessions: 0 active, 0 merging", "<6>level=INFO msg=listening", "<6>level=INFO msg=stopped")
}

// systemdLifecycle runs cmd as systemd would with Type=notify and a
// journal on stdout and stderr: its READY=1 message must be ready and
// come once port accepts connections; after SIGTERM it sends STOPPING=1
// and exits 0; its output has the journal lines.
func systemdLifecycle(t *testing.T, cmd *exec.Cmd, port int, ready string, lines ...string) {
	t.Helper()
	sock := sdnotifytest.Listen(t)
	out, env := journalEnv(t, sock)
	cmd.Stdout, cmd.Stderr, cmd.Env = out, out, env
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if got := sock.WaitFor(t, "READY=1", 10*time.Second); got != ready {
		t.Fatalf("ready message %q, want %q", got, ready)
	}
	// READY=1 means listening: a client is served at once.
	if err := testutil.WaitListening(fmt.Sprintf("127.0.0.1:%d", port), time.Millisecond); err != nil {
		t.Fatalf("READY=1 before the port accepts connections: %v", err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	sock.WaitFor(t, "STOPPING=1", 10*time.Second)
	if code := waitExit(t, cmd); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
	checkJournalLines(t, out, lines...)
}
