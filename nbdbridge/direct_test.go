package nbdbridge

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns a connected loopback TCP pair.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-acc
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestKernelSocket: the descriptor handed to the kernel is blocking, has
// the keepalive options, is still connected after the net.Conn is closed,
// and the sentinel tells an adopted socket from a dropped one.
func TestKernelSocket(t *testing.T) {
	c, srv := tcpPair(t)
	fd, err := kernelSocket(c)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if fl&unix.O_NONBLOCK != 0 {
		t.Error("kernel socket is non-blocking")
	}
	for _, o := range []struct{ level, opt, want int }{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1}, {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, directKeepIdle}, {unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 15000},
	} {
		if v, err := unix.GetsockoptInt(fd, o.level, o.opt); err != nil || v != o.want {
			t.Errorf("sockopt %d/%d = %d %v, want %d", o.level, o.opt, v, err, o.want)
		}
	}
	// still connected through fd
	if _, err := unix.Write(fd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	srv.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(srv, b); err != nil || string(b) != "ping" {
		t.Fatalf("through the descriptor: %q %v", b, err)
	}
	if hungUp(fd) {
		t.Fatal("live socket reported hung up")
	}
	if err := markOffered(fd); err != nil {
		t.Fatal(err)
	}
	if adopted(fd) {
		t.Fatal("a socket with the sentinel counts as adopted")
	}
	tv := unix.Timeval{Sec: 1} // what the kernel writes for TIMEOUT 1 s
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if !adopted(fd) {
		t.Fatal("a socket with the kernel's timeout counts as dropped")
	}
	// data arriving is not a hang-up; the peer closing is
	srv.Write([]byte("data"))
	time.Sleep(50 * time.Millisecond)
	if hungUp(fd) {
		t.Fatal("pending data reported as a hang-up")
	}
	srv.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !hungUp(fd) {
		if time.Now().After(deadline) {
			t.Fatal("peer close not seen")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeDialer is a DirectDialer whose preferred server tests set.
type fakeDialer struct{ pref string }

func (f *fakeDialer) DialDirect(ctx context.Context, n int) ([]net.Conn, string, error) {
	return nil, "", context.Canceled
}
func (f *fakeDialer) Preferred() string { return f.pref }

// TestMigrateWhenIdle: a direct slot on a server that is no longer the
// preferred one is retired (shut down) only while the device is idle, or
// after migrateAfter even when busy.
func TestMigrateWhenIdle(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "block", "nbd5"), 0o755)
	inflight := filepath.Join(root, "block", "nbd5", "inflight")
	os.WriteFile(inflight, []byte("       1        0\n"), 0o644)
	c, peer := tcpPair(t)
	fd, err := kernelSocket(c)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	dial := &fakeDialer{pref: "A"}
	d := &Device{Index: 5, Path: "/dev/nbd5", sysfs: Sysfs{Root: root}, log: slog.New(slog.DiscardHandler),
		opts: AttachOptions{Direct: dial}}
	d.slots = []*slot{{direct: true, fd: fd, server: "A"}}
	var cs ctlState
	now := time.Now()
	d.migrate(&cs, now)
	if hungUp(fd) {
		t.Fatal("slot on the preferred server retired")
	}
	dial.pref = "B"
	d.migrate(&cs, now)
	if hungUp(fd) {
		t.Fatal("retired while a request is in flight")
	}
	os.WriteFile(inflight, []byte("       0        0\n"), 0o644)
	d.migrate(&cs, now.Add(time.Second))
	if !hungUp(fd) {
		t.Fatal("idle device: slot on the old server not retired")
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("server side of a retired slot: %v, want EOF", err)
	}

	// busy for longer than migrateAfter: moved anyway
	c2, _ := tcpPair(t)
	fd2, _ := kernelSocket(c2)
	defer unix.Close(fd2)
	d.slots = []*slot{{direct: true, fd: fd2, server: "A"}}
	os.WriteFile(inflight, []byte("       3        0\n"), 0o644)
	cs = ctlState{}
	d.migrate(&cs, now)
	d.migrate(&cs, now.Add(migrateAfter/2))
	if hungUp(fd2) {
		t.Fatal("busy device moved before migrateAfter")
	}
	d.migrate(&cs, now.Add(migrateAfter+time.Second))
	if !hungUp(fd2) {
		t.Fatal("busy device never moved")
	}
}

func TestReadStat(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "block", "nbd2"), 0o755)
	os.WriteFile(filepath.Join(root, "block", "nbd2", "stat"),
		[]byte("    1500        3    96000     4521        0        0        0        0        2     3000     4521        0        0        0        0\n"), 0o644)
	s := Sysfs{Root: root}
	reads, ms, err := s.readStat(2)
	if err != nil || reads != 1500 || ms != 4521 {
		t.Fatalf("readStat = %d %d %v", reads, ms, err)
	}
	os.WriteFile(filepath.Join(root, "block", "nbd2", "stat"), []byte("12 x\n"), 0o644)
	if _, _, err := s.readStat(2); err == nil {
		t.Fatal("garbage accepted")
	}
	if _, _, err := s.readStat(9); err == nil {
		t.Fatal("missing device accepted")
	}
}

// directSlot returns a direct slot on a loopback connection and a
// function that hangs the connection up from the server's side.
func directSlot(t *testing.T, server string) (*slot, func()) {
	t.Helper()
	c, peer := tcpPair(t)
	fd, err := kernelSocket(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &slot{direct: true, fd: fd, server: server}, func() { peer.Close() }
}

// TestStepDisconnectOrFailure: direct slots that all hang up with no
// LINK_DEAD are a disconnect (after the grace); with a LINK_DEAD they are
// a failure the control loop tries to replace (here the replacement fails:
// no nbd module on the test machine) instead of giving up.
func TestStepDisconnectOrFailure(t *testing.T) {
	newDev := func() *Device {
		d := &Device{Index: 7, Path: "/dev/nbd7", sysfs: Sysfs{Root: t.TempDir()}, log: slog.New(slog.DiscardHandler),
			opts: AttachOptions{Connections: 2, DirectTimeout: time.Second}, directTimeout: time.Second, discCh: make(chan struct{})}
		d.ctx, d.cancel = context.WithCancel(context.Background())
		t.Cleanup(d.cancel)
		return d
	}
	// disconnect
	d := newDev()
	s1, hang1 := directSlot(t, "A")
	s2, hang2 := directSlot(t, "A")
	d.slots = []*slot{s1, s2}
	var c ctlState
	if d.step(&c) {
		t.Fatal("live slots counted as disconnected")
	}
	hang1()
	hang2()
	time.Sleep(50 * time.Millisecond)
	if d.step(&c) || c.wait <= 0 {
		t.Fatalf("hang-ups decided before the grace (wait %v)", c.wait)
	}
	time.Sleep(c.wait + 10*time.Millisecond)
	if !d.step(&c) {
		t.Fatal("every slot hung up without LINK_DEAD: not a disconnect")
	}

	// failure
	d = newDev()
	s1, hang1 = directSlot(t, "A")
	s2, hang2 = directSlot(t, "A")
	d.slots = []*slot{s1, s2}
	c = ctlState{linkDeads: 2}
	hang1()
	hang2()
	time.Sleep(50 * time.Millisecond)
	if d.step(&c) {
		t.Fatal("hang-ups with LINK_DEAD counted as a disconnect")
	}
	if len(d.slots) != 0 || c.failures != 1 || c.retryAt.IsZero() {
		t.Fatalf("failure not handled: %d slots, %d failures, retry %v", len(d.slots), c.failures, c.retryAt)
	}
}

// TestFollowPreferredWhileBusy: after FollowPreferred (forceMove) a direct
// slot on the old server moves at once although requests are in flight;
// while the client fails over (preferred server unknown) the request is
// kept, and it ends once the slots are on the preferred server.
func TestFollowPreferredWhileBusy(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "block", "nbd6"), 0o755)
	os.WriteFile(filepath.Join(root, "block", "nbd6", "inflight"), []byte("       2        0\n"), 0o644)
	c, _ := tcpPair(t)
	fd, err := kernelSocket(c)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	dial := &fakeDialer{pref: ""} // failing over: no preferred server yet
	d := &Device{Index: 6, Path: "/dev/nbd6", sysfs: Sysfs{Root: root}, log: slog.New(slog.DiscardHandler),
		opts: AttachOptions{Direct: dial}}
	d.slots = []*slot{{direct: true, fd: fd, server: "A"}}
	cs := ctlState{forceMove: true}
	now := time.Now()
	d.migrate(&cs, now)
	if hungUp(fd) || !cs.forceMove {
		t.Fatalf("preferred server unknown: retired %v, forceMove %v; want kept, pending", hungUp(fd), cs.forceMove)
	}
	dial.pref = "B"
	d.migrate(&cs, now.Add(time.Second))
	if !hungUp(fd) {
		t.Fatal("FollowPreferred: busy slot on the old server not retired")
	}
	d.slots = []*slot{{direct: true, fd: -1, server: "B"}}
	d.migrate(&cs, now.Add(2*time.Second))
	if cs.forceMove {
		t.Fatal("forceMove still set with every slot on the preferred server")
	}
}

// countingDialer is a DirectDialer whose DialDirect fails with err (nil:
// returns one side of a pipe) and counts its calls.
type countingDialer struct {
	err   error
	dials int
}

func (f *countingDialer) DialDirect(ctx context.Context, n int) ([]net.Conn, string, error) {
	f.dials++
	if f.err != nil {
		return nil, "", f.err
	}
	a, b := net.Pipe()
	b.Close()
	return []net.Conn{a}, "B", nil
}
func (f *countingDialer) Preferred() string { return "B" }

// TestMigrateUpgrade: an idle device on a relay slot tries the direct
// path. A failed dial keeps the relay slot and waits directRetry before
// the next try; a successful one closes the relay slot so that the next
// step replaces it with a direct one.
func TestMigrateUpgrade(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "block", "nbd7"), 0o755)
	os.WriteFile(filepath.Join(root, "block", "nbd7", "inflight"), []byte("       0        0\n"), 0o644)
	dial := &countingDialer{err: errors.New("no server switches to NBD")}
	d := &Device{Index: 7, Path: "/dev/nbd7", sysfs: Sysfs{Root: root}, log: slog.New(slog.DiscardHandler),
		opts: AttachOptions{Direct: dial}}
	relay, peer := net.Pipe()
	defer peer.Close()
	d.slots = []*slot{{conn: relay}}
	var cs ctlState
	now := time.Now()
	d.migrate(&cs, now)
	if dial.dials != 1 || d.wantDirect() {
		t.Fatalf("after a failed dial: %d dials, wantDirect %v; want 1, false", dial.dials, d.wantDirect())
	}
	peer.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := peer.Read(make([]byte, 1)); err == io.EOF || err == io.ErrClosedPipe {
		t.Fatal("relay slot closed although the direct dial failed")
	}
	d.migrate(&cs, now.Add(directRetry/2))
	if dial.dials != 1 {
		t.Fatalf("tried again after %v, before directRetry", directRetry/2)
	}

	dial.err = nil
	d.directRetryAt = time.Time{}
	d.migrate(&cs, now.Add(directRetry+time.Second))
	if dial.dials != 2 {
		t.Fatalf("%d dials after directRetry, want 2", dial.dials)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("relay slot after a successful direct dial: %v, want closed (EOF)", err)
	}
}
