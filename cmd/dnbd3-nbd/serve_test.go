package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

// lineWriter collects output and delivers the first line on a channel.
type lineWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	first chan string
	sent  bool
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if line, _, ok := strings.Cut(w.buf.String(), "\n"); ok && !w.sent {
		w.sent = true
		w.first <- line
	}
	return len(p), nil
}

func (w *lineWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// startServe runs "dnbd3-nbd serve ARGS" until the test ends and returns
// the address it printed.
func startServe(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	out := &lineWriter{first: make(chan string, 1)}
	errb := &lineWriter{first: make(chan string, 1)}
	done := make(chan int, 1)
	go func() { done <- run(ctx, append([]string{"serve"}, args...), stdio{strings.NewReader(""), out, errb}) }()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("serve exited %d: %s", code, errb.String())
			}
		case <-time.After(30 * time.Second):
			t.Error("serve did not stop within 30 s")
		}
	})
	select {
	case addr := <-out.first:
		return addr
	case code := <-done:
		done <- code
		t.Fatalf("serve exited %d before listening: %s", code, errb.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("serve printed no address within 30 s: %s", errb.String())
	}
	return ""
}

// TestServeSocketMode: the unix socket of serve is 0600 even under umask 0
// (it used to follow the umask: 0777), and --socket-mode widens it exactly.
func TestServeSocketMode(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: genImage(1 << 20)})
	old := syscall.Umask(0)
	t.Cleanup(func() { syscall.Umask(old) })
	dir := t.TempDir()
	sess := filepath.Join(dir, "sess")
	os.Mkdir(sess, 0o700)
	for i, tc := range []struct {
		args []string
		want os.FileMode
	}{
		{nil, 0o600},
		{[]string{"--socket-mode", "0660"}, 0o660},
		{[]string{"-c", sess}, 0o600},
	} {
		sock := filepath.Join(dir, fmt.Sprintf("s%d.sock", i))
		startServe(t, append([]string{"-h", srv.Addr(), "-i", "img", "--listen", "unix:" + sock, "--log-level", "error"}, tc.args...)...)
		fi, err := os.Lstat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != tc.want {
			t.Errorf("serve %v: socket file %v, want mode %v", tc.args, fi.Mode(), tc.want)
		}
	}
}

// TestServeWritableTCP: a writable export over TCP starts only with
// --insecure-writable (TestFlagErrors covers the refusal without it).
func TestServeWritableTCP(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: genImage(1 << 20)})
	sess := t.TempDir()
	addr := startServe(t, "-h", srv.Addr(), "-i", "img", "-c", sess,
		"--listen", "tcp:127.0.0.1:0", "--insecure-writable", "--log-level", "error")
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("writable TCP export at %q: %v", addr, err)
	}
	c.Close()
}
