package nbdbridge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// srvTest is an engine served by ServeListener for a test.
type srvTest struct {
	e    *Engine
	addr string // socket path or host:port
	uri  string // NBD URI of the default export
	stop func() error
}

// srvTestStart serves b with ServeListener on a unix socket ("unix") or
// on 127.0.0.1 ("tcp"), export name "disk". stop cancels and returns
// ServeListener's result; it also runs at cleanup.
func srvTestStart(t testing.TB, b Backend, opts EngineOptions, network string) *srvTest {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = engTestLogger(t)
	}
	var spec string
	switch network {
	case "unix":
		spec = "unix:" + filepath.Join(t.TempDir(), "nbd.sock")
	case "tcp":
		spec = "tcp:127.0.0.1:0"
	}
	ln, err := ListenAddr(spec)
	if err != nil {
		t.Fatal(err)
	}
	s := &srvTest{e: NewEngine(b, opts), addr: ln.Addr().String()}
	if network == "unix" {
		s.uri = "nbd+unix:///?socket=" + s.addr
	} else {
		s.uri = "nbd://" + s.addr + "/"
	}
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() { res <- s.e.ServeListener(ctx, ln, "disk", "dnbd3go test export") }()
	var once bool
	var result error
	s.stop = func() error {
		if !once {
			once = true
			cancel()
			select {
			case result = <-res:
			case <-time.After(20 * time.Second):
				t.Error("ServeListener did not return")
			}
		}
		return result
	}
	t.Cleanup(func() { s.stop() })
	return s
}

func TestListenAddr(t *testing.T) {
	engTestNoLeak(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")

	ln, err := ListenAddr("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ListenAddr("unix:" + sock); err == nil || !strings.Contains(err.Error(), "another process listens") {
		t.Errorf("second listener on a live socket: %v", err)
	}
	// A stale socket file (listener gone, file left) is replaced.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	ln, err = ListenAddr("unix:" + sock)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	ln.Close()

	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, []byte("keep me"), 0o600)
	if _, err := ListenAddr("unix:" + regular); err == nil {
		t.Error("listening over a regular file succeeded")
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Error("regular file clobbered")
	}

	tl, err := ListenAddr("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if tl.Addr().Network() != "tcp" {
		t.Errorf("tcp listener on %s", tl.Addr().Network())
	}
	tl.Close()
	for _, bad := range []string{"", "unix:", "tcp", "udp:1.2.3.4:5", "/tmp/x.sock", "tcp:no-port"} {
		if l, err := ListenAddr(bad); err == nil {
			l.Close()
			t.Errorf("ListenAddr(%q) succeeded", bad)
		}
	}
}

// TestListenSocketMode: a unix socket file gets exactly the requested mode
// (0600 by default) whatever the umask: neither widened by a permissive
// umask nor narrowed by a strict one. Other users can connect only when a
// wider mode is asked for.
func TestListenSocketMode(t *testing.T) {
	engTestNoLeak(t)
	dir := t.TempDir()
	old := syscall.Umask(0)
	t.Cleanup(func() { syscall.Umask(old) })
	for i, tc := range []struct {
		umask int
		mode  fs.FileMode // 0: ListenAddr's default
		want  fs.FileMode
	}{
		{0, 0, 0o600},
		{0o022, 0, 0o600},
		{0o077, 0o660, 0o660},
		{0o022, 0o666, 0o666},
		{0, 0o640, 0o640},
	} {
		syscall.Umask(tc.umask)
		sock := filepath.Join(dir, fmt.Sprintf("s%d", i))
		var ln net.Listener
		var err error
		if tc.mode == 0 {
			ln, err = ListenAddr("unix:" + sock)
		} else {
			lc := ListenConfig{SocketMode: tc.mode}
			ln, err = lc.Listen("unix:" + sock)
		}
		if err != nil {
			t.Fatalf("umask %03o mode %03o: %v", tc.umask, tc.mode, err)
		}
		fi, err := os.Lstat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != tc.want {
			t.Errorf("umask %03o mode %03o: socket file is %v, want socket %v", tc.umask, tc.mode, fi.Mode(), tc.want)
		}
		ln.Close()
	}
}

// TestListenAddrUnguarded: only a unix socket file is guarded by file
// permissions.
func TestListenAddrUnguarded(t *testing.T) {
	for spec, want := range map[string]bool{
		"unix:/run/x.sock": false,
		"unix:rel.sock":    false,
		"unix:@abstract":   true,
		"tcp:127.0.0.1:1":  true,
		"tcp::10809":       true,
		"bogus":            true,
	} {
		if got := ListenAddrUnguarded(spec); got != want {
			t.Errorf("ListenAddrUnguarded(%q) = %v, want %v", spec, got, want)
		}
	}
}

// TestServeListenerLifecycle: clients are served concurrently; cancelling
// ends ServeListener (nil) only after its connections ended; Close makes
// it return ErrEngineClosed.
func TestServeListenerLifecycle(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(11, 1<<20)
	s := srvTestStart(t, NewMemoryBackendFrom(bytes.Clone(data)), EngineOptions{}, "unix")

	var clients []*engTestClient
	for range 3 {
		conn, err := net.Dial("unix", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		c := &hsTestClient{t: t, conn: conn}
		var g [18]byte
		if _, err := conn.Read(g[:]); err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte{0, 0, 0, 3})
		c.option(wireOptGo, hsTestInfoData(""))
		c.expectInfo(wireOptGo, s.e, "disk", "dnbd3go test export")
		k := newEngTestClient(t, conn)
		if r := k.do(wireCmdRead, 0, 100, 10, nil); r.errno != 0 || !bytes.Equal(r.data, data[100:110]) {
			t.Fatal("READ failed")
		}
		clients = append(clients, k)
	}
	if st := s.e.Stats(); st.Connections != 3 {
		t.Errorf("%d connections, want 3", st.Connections)
	}
	clients[0].disc()
	<-clients[0].done
	if err := s.stop(); err != nil {
		t.Errorf("ServeListener after cancel: %v", err)
	}
	for _, c := range clients {
		<-c.done // every connection was closed
	}
	if err := s.e.Wait(context.Background()); err != nil {
		t.Error(err)
	}
	if _, err := net.Dial("unix", s.addr); err == nil {
		t.Error("listener still accepting")
	}

	e := NewEngine(NewMemoryBackend(4096), EngineOptions{})
	ln, err := ListenAddr("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() { res <- e.ServeListener(context.Background(), ln, "", "") }()
	time.Sleep(10 * time.Millisecond)
	e.Close()
	if err := engTestResult(t, res); !errors.Is(err, ErrEngineClosed) {
		t.Errorf("ServeListener after Close: %v", err)
	}
	if err := e.ServeListener(context.Background(), ln, "", ""); !errors.Is(err, ErrEngineClosed) {
		t.Errorf("ServeListener on a closed engine: %v", err)
	}
}
