package netns

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

// makeImage writes size pseudo-random bytes (seeded by name) to
// dir/name.r1 and returns the file's sha256.
func makeImage(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	var seed [32]byte
	copy(seed[:], name)
	rng := rand.NewChaCha8(seed)
	path := filepath.Join(dir, name+".r1")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, mib)
	for left := size; left > 0; {
		n := min(left, int64(len(buf)))
		rng.Read(buf[:n])
		h.Write(buf[:n])
		if _, err := f.Write(buf[:n]); err != nil {
			t.Fatal(err)
		}
		left -= n
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// getResult is the outcome of one dnbd3-nbd get.
type getResult struct {
	took   time.Duration
	err    error  // exit status (nil = 0)
	output string // stdout+stderr
	file   string
	killed bool // we killed it at the deadline
}

// rate is the read rate in bytes per second for n bytes.
func (r getResult) rate(n int64) float64 { return float64(n) / r.took.Seconds() }

// client is a dnbd3-nbd get running in the background.
type client struct {
	cmd   *exec.Cmd
	out   *bytes.Buffer
	start time.Time
	file  string
	done  chan getResult
}

// startGet runs `dnbd3-nbd get -h HOSTS -i IMAGE -o FILE -q ARGS...` in
// namespace ns. It is killed after limit (the result then says killed).
func startGet(t *testing.T, ns, hosts, image string, limit time.Duration, args ...string) *client {
	t.Helper()
	file := filepath.Join(t.TempDir(), "get-"+image)
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	argv := append([]string{"netns", "exec", ns, filepath.Join(binDir, "dnbd3-nbd"), "get",
		"-h", hosts, "-i", image, "-o", file, "-q", "--log-level", "info"}, args...)
	cmd := exec.CommandContext(ctx, "ip", argv...)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	c := &client{cmd: cmd, out: out, file: file, done: make(chan getResult, 1)}
	c.start = time.Now()
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start dnbd3-nbd get: %v", err)
	}
	go func() {
		err := cmd.Wait()
		took := time.Since(c.start)
		killed := ctx.Err() != nil
		cancel()
		c.done <- getResult{took: took, err: err, output: out.String(), file: file, killed: killed}
	}()
	t.Cleanup(func() {
		if cmd.Process != nil {
			cmd.Process.Kill()
		}
	})
	return c
}

// wait returns the client's result (the client is killed at its limit).
func (c *client) wait() getResult {
	r := <-c.done
	c.done <- r
	return r
}

// runGet runs dnbd3-nbd get to completion (at most limit).
func runGet(t *testing.T, ns, hosts, image string, limit time.Duration, args ...string) getResult {
	t.Helper()
	return startGet(t, ns, hosts, image, limit, args...).wait()
}

// mustGet runs dnbd3-nbd get and fails the test unless it succeeds and the
// file's sha256 is want (an empty want skips the comparison).
func mustGet(t *testing.T, what, ns, hosts, image, want string, limit time.Duration, args ...string) getResult {
	t.Helper()
	r := runGet(t, ns, hosts, image, limit, args...)
	checkGet(t, what, r, want)
	return r
}

// checkGet fails the test unless r succeeded with a file of sha256 want.
func checkGet(t *testing.T, what string, r getResult, want string) {
	t.Helper()
	if r.killed {
		t.Fatalf("%s: dnbd3-nbd get did not finish within %v (killed)\n%s", what, r.took.Round(time.Millisecond), r.output)
	}
	if r.err != nil {
		t.Fatalf("%s: dnbd3-nbd get failed after %v: %v\n%s", what, r.took.Round(time.Millisecond), r.err, r.output)
	}
	if want == "" {
		return
	}
	got, err := testutil.SHA256Of(r.file)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if got != want {
		t.Fatalf("%s: the data read differs from the image: sha256 %s, want %s\n%s", what, got, want, r.output)
	}
}

// mbps formats a rate in bytes/s as MB/s.
func mbps(r float64) string { return fmt.Sprintf("%.1f MB/s", r/1e6) }

// trimOutput shortens a client's output for messages.
func trimOutput(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > 30 {
		lines = append(lines[:10], append([]string{"..."}, lines[len(lines)-20:]...)...)
	}
	return strings.Join(lines, "\n")
}
