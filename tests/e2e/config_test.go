package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestServerCreateSizeSuffixes: --size takes the command-line size rules
// (K, M, G, T, optionally followed by iB or B: powers of 1024), not
// server.conf's (where a lower-case m means minutes), and a bad size names
// the value.
func TestServerCreateSizeSuffixes(t *testing.T) {
	base := t.TempDir()
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nsparseFiles=true\n"), 0o644)
	for i, tc := range []struct {
		size string
		want int64
	}{
		{"4M", 4 << 20},
		{"4MiB", 4 << 20},
		{"4m", 4 << 20},
		{"4G", 4 << 30},
		{"100000", 102400},
	} {
		rid := string(rune('1' + i))
		_, stderr, code := run(t, "dnbd3-server", "-c", etc, "--create", "img", "--revision", rid, "--size", tc.size)
		if code != 0 {
			t.Fatalf("--size %s: exit %d: %s", tc.size, code, stderr)
		}
		st, err := os.Stat(filepath.Join(base, "img.r"+rid))
		if err != nil || st.Size() != tc.want {
			t.Errorf("--size %s: created %v bytes (%v), want %d", tc.size, st.Size(), err, tc.want)
		}
	}
	_, stderr, code := run(t, "dnbd3-server", "-c", etc, "--create", "bad", "--revision", "1", "--size", "10Q")
	if code != 2 || !strings.Contains(stderr, `"10Q"`) {
		t.Errorf("--size 10Q: exit %d, stderr %q; want 2 and the bad value named", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(base, "bad.r1")); err == nil {
		t.Error("--size 10Q created an image")
	}
	_, stderr, code = run(t, "dnbd3-server", "-c", etc, "--create", "bad", "--size", "1M")
	if code != 2 || !strings.Contains(stderr, "--revision") {
		t.Errorf("--create without --revision: exit %d, stderr %q", code, stderr)
	}
}

// confDir writes a configuration directory with server.conf text and the
// other files given.
func confDir(t *testing.T, conf string, files map[string]string) string {
	t.Helper()
	etc := t.TempDir()
	files["server.conf"] = conf
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return etc
}

// startRefused runs a dnbd3-server start that must fail at once; one
// that serves instead is killed after 10 s and reported.
func startRefused(t *testing.T, args ...string) (stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin("dnbd3-server"), args...)
	var e bytes.Buffer
	cmd.Stderr = &e
	cmd.Run()
	if ctx.Err() != nil {
		t.Errorf("dnbd3-server %v is still running after 10 s instead of refusing to start", args)
	}
	return e.String(), cmd.ProcessState.ExitCode()
}

// TestServerCheckConfig runs `dnbd3-server --check-config` like an admin
// and checks its output (every problem with file:line) and exit status,
// and that a start (-n) refuses the same errors instead of serving
// nothing.
func TestServerCheckConfig(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "img.r1"), 4096)
	port := freePort(t)
	good := fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n", base, port)

	etc := confDir(t, good, map[string]string{})
	out, _, code := run(t, "dnbd3-server", "--check-config", "-c", etc)
	if code != 0 || out != etc+": OK, 0 warnings\n" {
		t.Errorf("good directory: exit %d\n%s", code, out)
	}

	// Warnings only: exit 0.
	etc = confDir(t, good+"backgroundReplicaton=true\n[limits]\nmaxClinets=10\n[logging]\nconsoleMask=error warning\n", map[string]string{})
	out, _, code = run(t, "dnbd3-server", "--check-config", "-c", etc)
	want := etc + "/server.conf:4: warning: [dnbd3] backgroundReplicaton is not a known key (did you mean [dnbd3] backgroundReplication?); ignored\n" +
		etc + "/server.conf:6: warning: [limits] maxClinets is not a known key (did you mean [limits] maxClients?); ignored\n" +
		etc + "/server.conf:8: warning: [logging] consoleMask=error warning: selects no level, so nothing at all is logged there, not even errors (the level words are ERROR, WARNING, MINOR, INFO, DEBUG1, DEBUG2, upper-case); did you mean ERROR WARNING?\n" +
		etc + ": OK, 3 warnings\n"
	if code != 0 || out != want {
		t.Errorf("warnings: exit %d\n%s\nwant\n%s", code, out, want)
	}

	// Errors: exit 1, every problem listed.
	etc = confDir(t, "[dnbd3]\nbasePath="+base+"/missing\nlistenPort=70000\n", map[string]string{
		"rpc.acl":     "# admins\n10.0.0.300 ALL\n",
		"alt-servers": "[192.0.2.1:0]\ncomment=bad port\n",
	})
	out, _, code = run(t, "dnbd3-server", "--check-config", "-c", etc)
	for _, w := range []string{
		etc + "/server.conf:2: error: basePath " + base + "/missing does not exist",
		etc + "/server.conf:3: error: [dnbd3] listenPort=70000: out of range 1…65535",
		etc + "/alt-servers:2: warning: invalid host section [192.0.2.1:0]: invalid port \"0\"",
		etc + "/rpc.acl:2: warning: invalid address \"10.0.0.300\"",
		etc + "/rpc.acl: error: no line is a valid rule",
		etc + ": 3 errors, 2 warnings: dnbd3-server would not start\n",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("errors: output lacks %q:\n%s", w, out)
		}
	}
	if code != 1 {
		t.Errorf("errors: exit %d, want 1", code)
	}
	// The start refuses the same errors, before detaching.
	for _, mode := range [][]string{{"-n"}, {}} {
		stderr, code := startRefused(t, append(mode, "-c", etc)...)
		if code != 1 || !strings.Contains(stderr, "dnbd3-server: "+etc+"/server.conf:3: error: [dnbd3] listenPort=70000") ||
			!strings.Contains(stderr, "basePath "+base+"/missing does not exist") || !strings.Contains(stderr, "--check-config") {
			t.Errorf("start %v with errors: exit %d\n%s", mode, code, stderr)
		}
	}

	// basePath is a file; a proxy's basePath that is not writable.
	etc = confDir(t, "[dnbd3]\nbasePath="+base+"/img.r1\n", map[string]string{})
	if out, _, code := run(t, "dnbd3-server", "--check-config", "-c", etc); code != 1 || !strings.Contains(out, "is a file, not a directory") {
		t.Errorf("basePath is a file: exit %d\n%s", code, out)
	}
	ro := t.TempDir()
	randomImage(t, filepath.Join(ro, "img.r1"), 4096)
	testutil.ReadOnlyDir(t, ro)
	etc = confDir(t, fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\nisProxy=true\n", ro, port), map[string]string{"alt-servers": "[192.0.2.1]\ncomment=up\n"})
	if out, _, code := run(t, "dnbd3-server", "--check-config", "-c", etc); code != 1 || !strings.Contains(out, "/server.conf:2: error: basePath "+ro+" is not writable") {
		t.Errorf("read-only proxy basePath: exit %d\n%s", code, out)
	}
	if stderr, code := startRefused(t, "-n", "-c", etc); code != 1 || !strings.Contains(stderr, "is not writable") {
		t.Errorf("start of a proxy with a read-only basePath: exit %d\n%s", code, stderr)
	}
}

// TestServerOpenRPCOptIn: an rpc.acl without a valid rule stops the start
// unless --allow-open-rpc says the open RPC is deliberate.
func TestServerOpenRPCOptIn(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "img.r1"), 4096)
	port := freePort(t)
	etc := confDir(t, fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\n", base, port), map[string]string{"rpc.acl": "127.0.0.1 EVERYTHING\n"})
	if stderr, code := startRefused(t, "-n", "-c", etc, "-b", "127.0.0.1"); code != 1 || !strings.Contains(stderr, "--allow-open-rpc") {
		t.Fatalf("open rpc.acl: exit %d\n%s", code, stderr)
	}
	out, _, code := run(t, "dnbd3-server", "--check-config", "--allow-open-rpc", "-c", etc)
	if code != 0 || !strings.Contains(out, "rpc.acl: warning: no line is a valid rule, so the RPC is open to everyone") {
		t.Errorf("--check-config --allow-open-rpc: exit %d\n%s", code, out)
	}
	d := runServerBinary(t, etc, port, "--allow-open-rpc")
	if _, ok := d.query(t, "config")["config"]; !ok {
		t.Error("the RPC is not open with --allow-open-rpc")
	}
	if !strings.Contains(d.logText(), "RPC is open to everyone") {
		t.Errorf("no warning about the open RPC in the log:\n%s", d.logText())
	}
}

// TestServerCRCThenSIGHUP: `dnbd3-server --crc` for an image the running
// server has loaded, then SIGHUP: the server takes the list for the same
// image; nothing "changed on disk", the image keeps its id.
func TestServerCRCThenSIGHUP(t *testing.T) {
	base := t.TempDir()
	img := filepath.Join(base, "lab", "win.r1")
	randomImage(t, img, 20<<20)
	d := startDaemon(t, base)
	if _, stderr, code := run(t, "dnbd3-server", "--crc", img); code != 0 {
		t.Fatalf("--crc: %s", stderr)
	}
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, "reloaded")
	if strings.Contains(d.logText(), "image changed on disk") {
		t.Errorf("SIGHUP after --crc logged a change:\n%s", d.logText())
	}
	if !strings.Contains(d.logText(), "CRC list added to a loaded image") {
		t.Errorf("the new CRC list was not taken:\n%s", d.logText())
	}
	imgs := d.query(t, "images")["images"].([]any)
	if len(imgs) != 1 || imgs[0].(map[string]any)["id"].(float64) != 1 {
		t.Errorf("images after SIGHUP: %v", imgs)
	}
}

// TestServerStartLogsConfigWarnings: the warnings --check-config prints
// are in the log of a start, with their file and line.
func TestServerStartLogsConfigWarnings(t *testing.T) {
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "img.r1"), 4096)
	port := freePort(t)
	etc := confDir(t, fmt.Sprintf("[dnbd3]\nbasePath=%s\nlistenPort=%d\nbackgroundReplicaton=true\n", base, port), map[string]string{})
	d := runServerBinary(t, etc, port)
	d.waitLog(t, `msg="[dnbd3] backgroundReplicaton is not a known key (did you mean [dnbd3] backgroundReplication?); ignored" at=`+etc+"/server.conf:4")
}
