package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// testServer is a Server on a random loopback port.
type testServer struct {
	*Server
	addr      string
	base      string
	configDir string
	cancel    context.CancelFunc
	done      chan error
}

// startServer writes a config directory (server.conf with basePath=base
// plus extra lines, and any other files given) and starts a server.
func startServer(t *testing.T, base string, conf string, files map[string]string) *testServer {
	t.Helper()
	dir, cfg := writeConfigDir(t, base, conf, files)
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: testutil.Logger(t), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: srv, base: base, configDir: dir}
	ts.addr, ts.cancel, ts.done = serveTest(t, srv, "127.0.0.1:0")
	t.Cleanup(ts.stop)
	return ts
}

// writeConfigDir writes a config directory: server.conf with
// "[dnbd3] basePath=base" plus conf, and the other files given. It returns
// the directory and the configuration loaded from it.
func writeConfigDir(t testing.TB, base, conf string, files map[string]string) (string, Config) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\n"+conf), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg, warns, err := LoadConfig(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warns {
		t.Log("config:", w)
	}
	return dir, cfg
}

// serveTest runs srv on a new listener on addr. Cancelling stops it;
// Serve's result arrives on done.
func serveTest(t testing.TB, srv *Server, addr string) (listening string, cancel context.CancelFunc, done chan error) {
	t.Helper()
	ln, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	return ln.Addr().String(), cancel, done
}

func (ts *testServer) stop() {
	ts.cancel()
	select {
	case <-ts.done:
	case <-time.After(10 * time.Second):
		panic("server did not stop within 10 s")
	}
}

// crctestFiles creates the image set of the captured traffic: crctest rid 1
// (41,953,361 generator bytes, with the reference's .crc) and cowsrc rid 1
// (8 MiB), and returns the base path.
func crctestFiles(t *testing.T) string {
	t.Helper()
	base := t.TempDir()
	testutil.WriteGenImage(t, filepath.Join(base, "crctest.r1"), 41953361)
	crc, err := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.crc"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "crctest.r1.crc"), crc, 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.WriteGenImage(t, filepath.Join(base, "cowsrc.r1"), 8388608)
	return base
}

// capturedAltServers is the alt-servers file of the captured setup.
const capturedAltServers = "[127.0.0.2:5003]\ncomment=alt A (IPv4, nothing listens)\n\n[[::1]:5004]\ncomment=alt B (IPv6, nothing listens)\n"

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

func send(t *testing.T, c net.Conn, req protocol.Request, payload []byte) {
	t.Helper()
	hdr := req.Marshal()
	if _, err := c.Write(append(hdr[:], payload...)); err != nil {
		t.Fatal(err)
	}
}

func readReply(t *testing.T, c net.Conn) (protocol.Reply, []byte) {
	t.Helper()
	var hdr [protocol.ReplySize]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("read reply header: %v", err)
	}
	r, err := protocol.ParseReply(hdr[:])
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, r.Size)
	if _, err := io.ReadFull(c, p); err != nil {
		t.Fatalf("read %d payload bytes: %v", r.Size, err)
	}
	return r, p
}

func handshake(t *testing.T, c net.Conn, name string, rid uint16) protocol.SelectImageReply {
	t.Helper()
	p := protocol.SelectImage{Version: 3, Name: name, RID: rid}.Marshal()
	send(t, c, protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}, p)
	r, payload := readReply(t, c)
	if r.Cmd != protocol.CmdSelectImage {
		t.Fatalf("handshake reply %v", r)
	}
	s, err := protocol.ParseSelectImageReply(payload)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// expectClosed asserts the server closes c without sending anything.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	var b [1]byte
	n, err := c.Read(b[:])
	if n > 0 {
		t.Fatalf("server sent %#x, expected it to close the connection silently", b[0])
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after %v", within)
	}
}

// replay sends the captured requests of msgs on c and compares every reply
// byte for byte with the capture (data beyond the captured prefix of a
// truncated GET_BLOCK reply is checked against the generator rule).
func replay(t *testing.T, c net.Conn, msgs []testutil.WireMsg, fileSize int64) {
	t.Helper()
	var lastReq protocol.Request
	for _, m := range msgs {
		if m.FromClient {
			lastReq, _ = protocol.ParseRequest(m.Bytes)
			if _, err := c.Write(m.Bytes); err != nil {
				t.Fatal(err)
			}
			continue
		}
		r, payload := readReply(t, c)
		hdr := r.Marshal()
		got := append(hdr[:], payload...)
		want := m.Bytes
		if m.Truncated {
			if !bytes.Equal(got[:len(want)], want) {
				t.Fatalf("line %d: reply starts %x, captured %x", m.Line, got[:len(want)], want)
			}
			for i, b := range payload {
				off := int64(lastReq.Offset) + int64(i)
				exp := testutil.GenByte(off)
				if off >= fileSize {
					exp = 0
				}
				if b != exp {
					t.Fatalf("line %d: data byte %d = %#x, want %#x", m.Line, i, b, exp)
				}
			}
			continue
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("line %d (%s):\n got  %x\n want %x", m.Line, strings.SplitN(m.Comment, ";", 2)[0], got, want)
		}
	}
}

// logCapture records a logger's text output (and passes it to t.Log).
type logCapture struct {
	t  testing.TB
	mu sync.Mutex
	b  bytes.Buffer
}

// captureLogger returns a logger whose output String returns.
func captureLogger(t testing.TB) (*slog.Logger, *logCapture) {
	lc := &logCapture{t: t}
	return slog.New(slog.NewTextHandler(lc, &slog.HandlerOptions{Level: slog.LevelDebug})), lc
}

func (lc *logCapture) Write(p []byte) (int, error) {
	lc.mu.Lock()
	lc.b.Write(p)
	lc.mu.Unlock()
	func() {
		defer func() { _ = recover() }() // logging after the test ended
		lc.t.Log(strings.TrimRight(string(p), "\n"))
	}()
	return len(p), nil
}

// String returns everything logged so far.
func (lc *logCapture) String() string {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	return lc.b.String()
}
