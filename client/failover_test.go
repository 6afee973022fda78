package client

import (
	"context"
	"errors"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

// readLoop reads the whole image repeatedly in chunks until stop closes,
// checking every byte; it returns the first error.
func readLoop(img *Image, want []byte, chunk int, stop <-chan struct{}) error {
	buf := make([]byte, chunk)
	for {
		for off := 0; off < len(want); off += chunk {
			select {
			case <-stop:
				return nil
			default:
			}
			n := min(chunk, len(want)-off)
			if _, err := img.ReadAt(buf[:n], int64(off)); err != nil {
				return err
			}
			if string(buf[:n]) != string(want[off:off+n]) {
				return errors.New("data mismatch")
			}
		}
	}
}

func TestFailoverWhenActiveServerDies(t *testing.T) {
	t.Parallel()
	data := genImage(4<<20, 5)
	a, b := startPair(t, data)
	a.Update(func(bh *dnbd3test.Behavior) { bh.BlockDelay = 2 * time.Millisecond })
	img := openT(t, fastConfig(t, "test", a.Addr(), b.Addr()))
	if img.Stats().Current != a.Addr() {
		t.Fatalf("opened on %s, want %s", img.Stats().Current, a.Addr())
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- readLoop(img, data, 96<<10, stop)
		}()
	}
	eventually(t, 5*time.Second, "reads on A", func() bool { return a.Blocks() > 20 })
	a.Kill()
	killed := time.Now()
	eventually(t, 5*time.Second, "failover to B", func() bool { return img.Stats().Current == b.Addr() })
	t.Logf("failover took %v", time.Since(killed))
	eventually(t, 5*time.Second, "reads on B", func() bool { return b.Blocks() > 20 })
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	st := img.Stats()
	if st.Failovers < 1 || st.Failures < 1 || st.Servers[0].Failures < 1 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestSameIPDifferentPortsAreTwoServers(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 6)
	a, b := startPair(t, data)
	cfg := fastConfig(t, "test", a.Addr()+" "+b.Addr()) // one -h string
	cfg.Sticky = true
	img := openT(t, cfg)
	if st := img.Stats(); len(st.Servers) != 2 {
		t.Fatalf("servers: %+v", st.Servers)
	}
	a.Kill()
	got := readAll(t, img, 128<<10)
	checkRange(t, data, got, 0)
	if img.Stats().Current != b.Addr() {
		t.Fatalf("current = %s, want %s", img.Stats().Current, b.Addr())
	}
}

func TestStalledServerFailover(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 7)
	a, b := startPair(t, data)
	cfg := fastConfig(t, "test", a.Addr(), b.Addr())
	cfg.OpenStagger = 300 * time.Millisecond // A wins Open
	img := openT(t, cfg)
	a.Update(func(bh *dnbd3test.Behavior) { bh.StallBlocks = true; bh.StallHandshake = true })
	start := time.Now()
	got := make([]byte, 256<<10)
	if _, err := img.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	checkRange(t, data, got, 4096)
	if img.Stats().Current != b.Addr() {
		t.Fatalf("current = %s", img.Stats().Current)
	}
	// StallTimeout 250 ms, ticks of 20 ms, failover with FailedServerDelay 50 ms.
	if took > 2*time.Second {
		t.Fatalf("stall failover took %v", took)
	}
	t.Logf("stall detected and failed over in %v", took)
	if st := img.Stats(); !strings.Contains(st.Servers[0].LastError, "stalled") {
		t.Fatalf("A's last error: %q", st.Servers[0].LastError)
	}
}

func TestStalledHandshakeAtOpen(t *testing.T) {
	t.Parallel()
	data := genImage(64<<10, 7)
	a, b := startPair(t, data)
	a.Update(func(bh *dnbd3test.Behavior) { bh.StallHandshake = true })
	img := openT(t, fastConfig(t, "test", a.Addr(), b.Addr()))
	if img.Stats().Current != b.Addr() {
		t.Fatalf("current = %s", img.Stats().Current)
	}
}

func TestLearnedServersUsedForFailover(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 8)
	a, b := startPair(t, data)
	a.Update(func(bh *dnbd3test.Behavior) { bh.Servers = []netip.AddrPort{b.AddrPort(), a.AddrPort()} })
	img := openT(t, fastConfig(t, "test", a.Addr()))
	eventually(t, 2*time.Second, "B learned", func() bool { return len(img.Stats().Servers) == 2 })
	if st := img.Stats(); !st.Servers[1].Learned || st.Servers[1].Addr != b.Addr() {
		t.Fatalf("servers: %+v", st.Servers)
	}
	a.Kill()
	checkRange(t, data, readAll(t, img, 256<<10), 0)
	if img.Stats().Current != b.Addr() {
		t.Fatalf("current = %s", img.Stats().Current)
	}

	// Sticky: nothing learned, so nothing to fail over to.
	c := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	c.Update(func(bh *dnbd3test.Behavior) { bh.Servers = []netip.AddrPort{b.AddrPort()} })
	cfg := fastConfig(t, "test", c.Addr())
	cfg.Sticky = true
	cfg.Deadline = 300 * time.Millisecond
	img2 := openT(t, cfg)
	time.Sleep(50 * time.Millisecond)
	if n := len(img2.Stats().Servers); n != 1 || c.GetServers() != 0 {
		t.Fatalf("sticky image knows %d servers, sent %d GET_SERVERS", n, c.GetServers())
	}
	c.Kill()
	if _, err := img2.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrDeadline) {
		t.Fatalf("sticky read with its only server dead: %v", err)
	}
}

func TestDeadlineWhenAllServersDown(t *testing.T) {
	t.Parallel()
	a, b := startPair(t, genImage(64<<10, 0))
	cfg := fastConfig(t, "test", a.Addr(), b.Addr())
	cfg.Deadline = 400 * time.Millisecond
	img := openT(t, cfg)
	a.Kill()
	b.Kill()
	start := time.Now()
	n, err := img.ReadAt(make([]byte, 8192), 4096)
	took := time.Since(start)
	if !errors.Is(err, ErrDeadline) || n != 0 {
		t.Fatalf("read with all servers down: %d, %v", n, err)
	}
	if took < 350*time.Millisecond || took > 1500*time.Millisecond {
		t.Fatalf("deadline fired after %v, want about 400ms", took)
	}
	if !strings.Contains(err.Error(), "refused") && !strings.Contains(err.Error(), "closed") {
		t.Errorf("error does not say why: %v", err)
	}
	if st := img.Stats(); !st.Panic || st.Current != "" || st.Pending != 0 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestServerComesBackBeforeDeadline(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 9)
	a := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	cfg := fastConfig(t, "test", a.Addr())
	cfg.Deadline = 5 * time.Second
	img := openT(t, cfg)
	a.Kill()
	done := make(chan error, 1)
	buf := make([]byte, 512<<10)
	go func() {
		_, err := img.ReadAt(buf, 100000)
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("read returned while the server was down: %v", err)
	default:
	}
	if err := a.Restart(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("read did not complete after the server came back")
	}
	checkRange(t, data, buf, 100000)
	if img.Stats().Failovers != 1 {
		t.Fatalf("failovers = %d", img.Stats().Failovers)
	}
}

func TestCmdErrorIsRetried(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 10)
	a, b := startPair(t, data)
	img := openT(t, fastConfig(t, "test", a.Addr(), b.Addr()))
	a.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = true })
	buf := make([]byte, 64<<10)
	if _, err := img.ReadAt(buf, 8192); err != nil {
		t.Fatal(err)
	}
	checkRange(t, data, buf, 8192)
	if st := img.Stats(); st.Current != b.Addr() || !strings.Contains(st.Servers[0].LastError, "CMD_ERROR") {
		t.Fatalf("stats: %+v", st)
	}

	// A single server answering CMD_ERROR: the read waits (retrying) and
	// succeeds once the server recovers.
	c := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	cfg := fastConfig(t, "test", c.Addr())
	cfg.Deadline = 5 * time.Second
	img2 := openT(t, cfg)
	c.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = true })
	go func() {
		time.Sleep(300 * time.Millisecond)
		c.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = false })
	}()
	if _, err := img2.ReadAt(buf, 4096); err != nil {
		t.Fatal(err)
	}
	checkRange(t, data, buf, 4096)

	// ... and fails at the deadline if it never recovers.
	cfg.Deadline = 300 * time.Millisecond
	img3 := openT(t, cfg)
	c.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = true })
	if _, err := img3.ReadAt(buf, 0); !errors.Is(err, ErrDeadline) || !strings.Contains(err.Error(), "CMD_ERROR") {
		t.Fatalf("read against an always-failing server: %v", err)
	}
}

func TestMalformedRepliesFailOver(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 11)
	for _, g := range []struct {
		name string
		kind dnbd3test.Garbage
		want string
	}{
		{"bad magic", dnbd3test.GarbageBadMagic, "bad magic"},
		{"huge size", dnbd3test.GarbageHugeSize, "4294967295 bytes"},
		{"unknown handle", dnbd3test.GarbageUnknownHandle, "unknown handle"},
		{"wrong size", dnbd3test.GarbageWrongSize, "bytes"},
		{"unknown cmd", dnbd3test.GarbageUnknownCmd, "CMD_99"},
	} {
		t.Run(g.name, func(t *testing.T) {
			t.Parallel()
			a := startServer(t, dnbd3test.Image{Name: "test", Data: data})
			b := startServer(t, dnbd3test.Image{Name: "test", Data: data})
			img := openT(t, fastConfig(t, "test", a.Addr(), b.Addr()))
			a.Update(func(bh *dnbd3test.Behavior) { bh.Garbage = g.kind })
			buf := make([]byte, 64<<10)
			if _, err := img.ReadAt(buf, 12345); err != nil {
				t.Fatal(err)
			}
			checkRange(t, data, buf, 12345)
			st := img.Stats()
			if st.Current != b.Addr() || !strings.Contains(st.Servers[0].LastError, g.want) {
				t.Fatalf("current %s, A's last error %q (want %q)", st.Current, st.Servers[0].LastError, g.want)
			}
		})
	}
}

func TestFailoverRejectsDifferentImage(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 12)
	a := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	b := startServer(t, dnbd3test.Image{Name: "test", Data: data[:512<<10]}) // other size
	c := startServer(t, dnbd3test.Image{Name: "test", RID: 2, Data: data})   // other rid
	cfg := fastConfig(t, "test", a.Addr(), b.Addr(), c.Addr())
	cfg.RID = 1
	cfg.Deadline = 400 * time.Millisecond
	img := openT(t, cfg)
	a.Kill()
	if _, err := img.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrDeadline) {
		t.Fatalf("read: %v", err)
	}
	st := img.Stats()
	if !strings.Contains(st.Servers[1].LastError, "size") {
		t.Errorf("B's last error: %q", st.Servers[1].LastError)
	}
	if !strings.Contains(st.Servers[2].LastError, "image not found") && !strings.Contains(st.Servers[2].LastError, "SELECT_IMAGE") {
		t.Errorf("C's last error: %q", st.Servers[2].LastError)
	}
}

func TestGoroutinesAfterClose(t *testing.T) {
	// Not parallel: counts goroutines.
	data := genImage(1<<20, 13)
	a, b := startPair(t, data)
	before := countGoroutines()
	cfg := fastConfig(t, "test", a.Addr(), b.Addr())
	cfg.NoProbe = false
	cfg.ProbeStartupInterval = 20 * time.Millisecond
	cfg.KeepaliveInterval = 10 * time.Millisecond
	img, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, img, 64<<10)
	a.KillConns()
	readAll(t, img, 64<<10)
	b.Update(func(bh *dnbd3test.Behavior) { bh.StallBlocks = true })
	a.Update(func(bh *dnbd3test.Behavior) { bh.StallBlocks = true })
	go img.ReadAt(make([]byte, 4096), 0)
	time.Sleep(100 * time.Millisecond)
	img.Close()
	if err := waitGoroutines(before, 3*time.Second); err != nil {
		t.Fatal(err)
	}
}

// countGoroutines waits for the count to settle and returns it.
func countGoroutines() int {
	time.Sleep(20 * time.Millisecond)
	return runtime.NumGoroutine()
}

func TestOpenRespectsContext(t *testing.T) {
	t.Parallel()
	a := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(8192, 0)})
	a.Update(func(bh *dnbd3test.Behavior) { bh.StallHandshake = true })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	cfg := fastConfig(t, "test", a.Addr())
	cfg.ConnectTimeout = 5 * time.Second
	if _, err := Open(ctx, cfg); !errors.Is(err, ErrNoServer) {
		t.Fatalf("Open: %v", err)
	}
	if time.Since(start) > 2500*time.Millisecond { // well below ConnectTimeout (5 s)
		t.Fatalf("Open ignored its context: %v", time.Since(start))
	}
}

func TestServerDroppingConnectionsRepeatedly(t *testing.T) {
	t.Parallel()
	data := genImage(2<<20, 16)
	a := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	a.Update(func(bh *dnbd3test.Behavior) { bh.DropAfter = 5 })
	cfg := fastConfig(t, "test", a.Addr())
	cfg.MaxRequest = 32 << 10
	cfg.Deadline = 10 * time.Second
	img := openT(t, cfg)
	checkRange(t, data, readAll(t, img, 256<<10), 0) // 64 requests, a new connection every 5
	if n := a.Accepted(); n < 10 {
		t.Fatalf("only %d connections for 64 requests dropped every 5", n)
	}
	if st := img.Stats(); st.Failovers < 9 {
		t.Fatalf("failovers = %d", st.Failovers)
	}
}

func TestNoHotLoopOnUselessServer(t *testing.T) {
	t.Parallel()
	a := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(64<<10, 0)})
	cfg := fastConfig(t, "test", a.Addr())
	cfg.Deadline = 600 * time.Millisecond
	img := openT(t, cfg)
	a.Update(func(bh *dnbd3test.Behavior) { bh.DropAfter = -1 }) // handshakes fine, drops every read
	if _, err := img.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrDeadline) {
		t.Fatalf("read: %v", err)
	}
	// Backoff 20, 40, 80, 100, 100 ... ms: about 8 connections, not hundreds.
	if n := a.Accepted(); n > 20 {
		t.Fatalf("%d connections in 600 ms: failover loops without backoff", n)
	}
}
