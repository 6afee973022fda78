package nbdbridge

// A Go fake of the kernel's NBD client for the engine tests: it speaks the
// transmission phase on a socketpair, keeps many requests in flight and
// matches replies by cookie.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/pojntfx/go-nbd/pkg/protocol"
	"golang.org/x/sys/unix"
)

// engTestSocketPair returns both ends of an AF_UNIX stream socketpair as
// net.Conns — the same kind of connection the kernel path uses.
func engTestSocketPair(t testing.TB) (server, client net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		conns[i] = c
	}
	t.Cleanup(func() { conns[0].Close(); conns[1].Close() })
	return conns[0], conns[1]
}

// engTestReply is one reply as the fake client saw it.
type engTestReply struct {
	cookie uint64
	errno  uint32
	data   []byte
	seq    uint64 // arrival order on the connection
}

type engTestPending struct {
	typ    uint16
	length uint32
	ch     chan engTestReply
}

// engTestClient is the fake kernel client.
type engTestClient struct {
	t    testing.TB
	conn net.Conn

	wmu        sync.Mutex
	mu         sync.Mutex
	pending    map[uint64]*engTestPending
	nextCookie atomic.Uint64
	seq        uint64
	outOfOrder atomic.Int64 // replies that overtook an earlier request
	lastCookie uint64
	readErr    error
	done       chan struct{}
}

func newEngTestClient(t testing.TB, conn net.Conn) *engTestClient {
	c := &engTestClient{t: t, conn: conn, pending: map[uint64]*engTestPending{}, done: make(chan struct{})}
	c.nextCookie.Store(1000)
	go c.readLoop()
	return c
}

func (c *engTestClient) readLoop() {
	defer close(c.done)
	var hb [wireReplySize]byte
	for {
		if _, err := io.ReadFull(c.conn, hb[:]); err != nil {
			c.finish(err)
			return
		}
		h, err := parseReply(hb[:])
		if err != nil {
			c.finish(err)
			return
		}
		c.mu.Lock()
		p := c.pending[h.Handle]
		delete(c.pending, h.Handle)
		c.seq++
		seq := c.seq
		if h.Handle < c.lastCookie {
			c.outOfOrder.Add(1)
		}
		c.lastCookie = max(c.lastCookie, h.Handle)
		c.mu.Unlock()
		if p == nil {
			c.finish(fmt.Errorf("reply for unknown cookie %d", h.Handle))
			return
		}
		r := engTestReply{cookie: h.Handle, errno: h.Error, seq: seq}
		if p.typ == wireCmdRead && h.Error == 0 {
			r.data = make([]byte, p.length)
			if _, err := io.ReadFull(c.conn, r.data); err != nil {
				c.finish(fmt.Errorf("reading data of cookie %d: %w", h.Handle, err))
				return
			}
		}
		p.ch <- r
	}
}

func (c *engTestClient) finish(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.readErr = err
	for k, p := range c.pending {
		close(p.ch)
		delete(c.pending, k)
	}
}

// send queues a request and returns its cookie and the reply channel
// (closed without a value if the connection ends first).
func (c *engTestClient) send(typ, flags uint16, off uint64, length uint32, payload []byte) (uint64, <-chan engTestReply) {
	cookie := c.nextCookie.Add(1)
	p := &engTestPending{typ: typ, length: length, ch: make(chan engTestReply, 1)}
	c.mu.Lock()
	if c.readErr != nil {
		close(p.ch)
	} else {
		c.pending[cookie] = p
	}
	c.mu.Unlock()
	c.sendRaw(protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
		CommandFlags: flags, Type: typ, Handle: cookie, Offset: off, Length: length}, payload)
	return cookie, p.ch
}

// sendRaw writes a request header and payload as they are.
func (c *engTestClient) sendRaw(h protocol.TransmissionRequestHeader, payload []byte) error {
	buf := make([]byte, wireRequestSize, wireRequestSize+len(payload))
	putRequest(buf, h)
	buf = append(buf, payload...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.conn.Write(buf)
	return err
}

// do sends a request and waits for its reply.
func (c *engTestClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) engTestReply {
	c.t.Helper()
	_, ch := c.send(typ, flags, off, length, payload)
	return c.wait(ch)
}

func (c *engTestClient) wait(ch <-chan engTestReply) engTestReply {
	c.t.Helper()
	select {
	case r, ok := <-ch:
		if !ok {
			c.mu.Lock()
			err := c.readErr
			c.mu.Unlock()
			c.t.Fatalf("connection ended before the reply: %v", err)
		}
		return r
	case <-time.After(20 * time.Second):
		c.t.Fatal("no reply within 20 s")
	}
	return engTestReply{}
}

// disc sends NBD_CMD_DISC.
func (c *engTestClient) disc() {
	c.sendRaw(protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
		Type: wireCmdDisc, Handle: c.nextCookie.Add(1)}, nil)
}

// engTestServe starts ServeConn on a new socketpair and returns the client
// and a channel with ServeConn's result.
func engTestServe(t testing.TB, ctx context.Context, e *Engine) (*engTestClient, <-chan error) {
	t.Helper()
	srv, cli := engTestSocketPair(t)
	res := make(chan error, 1)
	go func() { res <- e.ServeConn(ctx, srv) }()
	return newEngTestClient(t, cli), res
}

// engTestResult waits for ServeConn's result.
func engTestResult(t testing.TB, res <-chan error) error {
	t.Helper()
	select {
	case err := <-res:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("ServeConn did not return within 20 s")
	}
	return nil
}

// engTestNoLeak fails the test if goroutines started during it are still
// running shortly after it (checked in cleanup).
func engTestNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// errnoName names NBD errors in failure messages.
func errnoName(e uint32) string {
	switch e {
	case 0:
		return "OK"
	case wireEPERM:
		return "EPERM"
	case wireEIO:
		return "EIO"
	case wireEINVAL:
		return "EINVAL"
	case wireENOSPC:
		return "ENOSPC"
	case wireESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("errno(%d)", e)
}

func engTestExpect(t testing.TB, what string, r engTestReply, want uint32) {
	t.Helper()
	if r.errno != want {
		t.Fatalf("%s: got %s, want %s", what, errnoName(r.errno), errnoName(want))
	}
}

var errEngTestInjected = errors.New("injected backend failure")

// engTestLogger logs through t (shown for failing tests or with -v).
func engTestLogger(t testing.TB) *slog.Logger { return testutil.Logger(t) }
