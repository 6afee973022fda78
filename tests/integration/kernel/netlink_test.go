package kernel

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 42))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

type readResult struct {
	took time.Duration // from issue to completion
	done time.Time     // completion
	err  error
}

// readAsync reads len(buf) bytes at off from f in the background.
func readAsync(f *os.File, buf []byte, off int64) <-chan readResult {
	ch := make(chan readResult, 1)
	start := time.Now()
	go func() {
		_, err := f.ReadAt(buf, off)
		ch <- readResult{time.Since(start), time.Now(), err}
	}()
	return ch
}

func waitLinkDead(t *testing.T, ch <-chan int, idx int) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		select {
		case got, ok := <-ch:
			if !ok {
				t.Fatal("link-dead channel closed")
			}
			if got == idx {
				return time.Since(start)
			}
			t.Logf("LINK_DEAD for another device: %d", got)
		case <-time.After(10 * time.Second):
			t.Fatalf("no LINK_DEAD for %s within 10 s", nbdbridge.DevicePath(idx))
		}
	}
}

// TestNetlinkConnectSmoke walks one device through the control plane:
// CONNECT, STATUS, sysfs, WaitReady, O_DIRECT I/O, InUse, a resize, the
// daemon dying (LINK_DEAD) and being replaced by RECONFIGURE with I/O in
// flight and queued, and DISCONNECT.
func TestNetlinkConnectSmoke(t *testing.T) {
	requireNBD(t)
	const size = 16 << 20
	const reqTimeout = 3 * time.Second
	srv := newMemServer(32 << 20) // room for the resize
	a := attach(t, srv, nbdbridge.ConnectOptions{
		Index: -1, SizeBytes: size, ServerFlags: nbdFlagHasFlags | nbdFlagSendFlush,
		Timeout: reqTimeout, DeadConnTimeout: 30 * time.Second,
	})
	idx, dev := a.idx, nbdbridge.DevicePath(a.idx)

	// STATUS
	if !connected(t, idx) {
		t.Fatal("STATUS: not connected after CONNECT")
	}
	all, err := nbdbridge.Status(-1)
	if err != nil {
		t.Fatal(err)
	}
	var conn []int
	for _, s := range all {
		if s.Connected {
			conn = append(conn, s.Index)
		}
	}
	if !slices.Equal(conn, []int{idx}) {
		t.Fatalf("Status(-1): connected devices %v, want [%d] (all: %v)", conn, idx, all)
	}
	t.Logf("Status(-1): %d devices, connected %v", len(all), conn)

	// sysfs
	if id, err := nbdbridge.DeviceBackend(idx); err != nil || id != a.id {
		t.Fatalf("sysfs backend = %q, %v; want %q", id, err, a.id)
	}
	if found, err := nbdbridge.FindByBackend(a.id); err != nil || !slices.Equal(found, []int{idx}) {
		t.Fatalf("FindByBackend = %v, %v", found, err)
	}
	pid, err := nbdbridge.DevicePID(idx)
	if err != nil {
		t.Fatalf("sysfs pid: %v", err)
	}
	tgid := ""
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Tgid:"); ok {
				tgid = strings.TrimSpace(v)
			}
		}
	}
	t.Logf("sysfs pid = %d (getpid %d, its Tgid %s)", pid, os.Getpid(), tgid)
	if tgid != strconv.Itoa(os.Getpid()) {
		t.Fatalf("sysfs pid %d is not a thread of this process", pid)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	if err := nbdbridge.WaitReady(ctx, idx, size); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	t.Logf("WaitReady took %v", time.Since(start).Round(time.Microsecond))

	// server -> device
	pattern := randomBytes(1, 1<<20)
	srv.fill(2<<20, pattern)
	f := openDirect(t, dev, os.O_RDWR)
	buf := testutil.AlignedBuf(t, 1<<20)
	if _, err := f.ReadAt(buf, 2<<20); err != nil {
		t.Fatalf("O_DIRECT read: %v", err)
	}
	if !bytes.Equal(buf, pattern) {
		t.Fatal("O_DIRECT read returned other bytes than the server holds")
	}
	// device -> server
	copy(buf, randomBytes(2, 1<<20))
	if _, err := f.WriteAt(buf, 5<<20); err != nil {
		t.Fatalf("O_DIRECT write: %v", err)
	}
	if !bytes.Equal(srv.snapshot(5<<20, 1<<20), buf) {
		t.Fatal("server did not receive the written bytes")
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	if srv.count(nbdCmdFlush) == 0 {
		t.Fatal("fsync sent no NBD_CMD_FLUSH although SEND_FLUSH is set")
	}
	back := testutil.AlignedBuf(t, 1<<20)
	if _, err := f.ReadAt(back, 5<<20); err != nil || !bytes.Equal(back, buf) {
		t.Fatalf("read back after write: %v, equal=%v", err, bytes.Equal(back, buf))
	}

	// InUse: a plain open does not count, an exclusive one does
	if busy, err := nbdbridge.InUse(idx); err != nil || busy {
		t.Fatalf("InUse with only a plain open = %v, %v; want false", busy, err)
	}
	excl, err := os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		t.Fatalf("exclusive open: %v", err)
	}
	if busy, err := nbdbridge.InUse(idx); err != nil || !busy {
		t.Fatalf("InUse while opened O_EXCL = %v, %v; want true", busy, err)
	}
	excl.Close()
	if busy, err := nbdbridge.InUse(idx); err != nil || busy {
		t.Fatalf("InUse after closing = %v, %v; want false", busy, err)
	}

	// resize with RECONFIGURE
	if err := nbdbridge.Reconfigure(idx, nbdbridge.ReconfigureOptions{BackendID: a.id, SizeBytes: 32 << 20}); err != nil {
		t.Fatalf("Reconfigure (resize): %v", err)
	}
	waitSize(t, idx, 32<<20)
	srv.fill(30<<20, pattern[:4096])
	if _, err := f.ReadAt(buf[:4096], 30<<20); err != nil || !bytes.Equal(buf[:4096], pattern[:4096]) {
		t.Fatalf("read beyond the old size: %v", err)
	}
	err = nbdbridge.Reconfigure(idx, nbdbridge.ReconfigureOptions{BackendID: "wrong", Timeout: time.Second})
	if err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("Reconfigure with a wrong backend id: %v", err)
	}
	t.Logf("wrong backend id: %v", err)

	// the daemon dies with a read in flight
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	events, err := nbdbridge.WatchLinkDead(wctx)
	if err != nil {
		t.Fatalf("WatchLinkDead: %v", err)
	}
	const heldOff, queuedOff = 7 << 20, 9 << 20
	srv.fill(heldOff, pattern[:4096])
	srv.fill(queuedOff, pattern[4096:8192])
	srv.mu.Lock()
	srv.hold = func(off uint64, _ uint32) bool { return off == heldOff }
	srv.mu.Unlock()
	heldBuf, queuedBuf := testutil.AlignedBuf(t, 4096), testutil.AlignedBuf(t, 4096)
	inflight := readAsync(f, heldBuf, heldOff)
	select {
	case <-srv.held:
	case r := <-inflight:
		t.Fatalf("held read completed: %v", r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("the held read never reached the server")
	}
	died := time.Now()
	a.conn.Close()
	if err := <-a.served; err == nil {
		t.Fatal("serve ended without error after close")
	}
	t.Logf("LINK_DEAD after %v", waitLinkDead(t, events, idx).Round(time.Microsecond))
	if !connected(t, idx) {
		t.Fatal("STATUS: not connected after the socket died")
	}
	t.Log("STATUS still reports connected with every socket dead")

	// a read issued while every socket is dead waits for RECONFIGURE
	queued := readAsync(f, queuedBuf, queuedOff)
	select {
	case r := <-queued:
		t.Fatalf("a read with every socket dead completed: %v", r.err)
	case <-time.After(500 * time.Millisecond):
	}

	srv.mu.Lock()
	srv.hold = nil
	srv.mu.Unlock()
	conn2, kfd := socketPair(t)
	a.conn = conn2
	served2 := make(chan error, 1)
	go func() { served2 <- srv.serve(conn2) }()
	reconf := time.Now()
	err = nbdbridge.Reconfigure(idx, nbdbridge.ReconfigureOptions{BackendID: a.id, SocketFDs: []int{kfd}})
	unix.Close(kfd)
	if err != nil {
		t.Fatalf("Reconfigure (new socket): %v", err)
	}
	t.Logf("RECONFIGURE %v after the socket died", reconf.Sub(died).Round(time.Millisecond))
	for name, ch := range map[string]<-chan readResult{"queued": queued, "in-flight": inflight} {
		select {
		case r := <-ch:
			if r.err != nil {
				t.Fatalf("%s read: %v", name, r.err)
			}
			t.Logf("%s read completed %v after RECONFIGURE (%v after it was issued)", name,
				r.done.Sub(reconf).Round(time.Millisecond), r.took.Round(time.Millisecond))
			if name == "queued" && r.done.Sub(reconf) >= reqTimeout {
				t.Errorf("the queued read waited for the request timeout instead of going to the new socket")
			}
		case <-time.After(reqTimeout + 10*time.Second):
			t.Fatalf("%s read did not complete after RECONFIGURE", name)
		}
	}
	if !bytes.Equal(heldBuf, pattern[:4096]) || !bytes.Equal(queuedBuf, pattern[4096:8192]) {
		t.Fatal("reads completed after RECONFIGURE returned wrong bytes")
	}

	// DISCONNECT
	f.Close()
	if err := nbdbridge.Disconnect(idx); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	select {
	case err := <-served2:
		if !errors.Is(err, errDisc) {
			t.Fatalf("serve after DISCONNECT: %v, want NBD_CMD_DISC", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no NBD_CMD_DISC after DISCONNECT")
	}
	waitSize(t, idx, 0)
	if connected(t, idx) {
		t.Fatal("STATUS: still connected after DISCONNECT")
	}
	if err := nbdbridge.Disconnect(idx); !errors.Is(err, nbdbridge.ErrNotConnected) {
		t.Fatalf("second Disconnect: %v, want ErrNotConnected", err)
	}
	if _, err := nbdbridge.DeviceBackend(idx); err == nil {
		t.Log("sysfs backend survives DISCONNECT")
	} else {
		t.Logf("sysfs backend after DISCONNECT: %v", err)
	}
}

// TestConnectErrors checks the errors users see for bad device choices.
func TestConnectErrors(t *testing.T) {
	requireNBD(t)
	_, kfd := socketPair(t)
	defer unix.Close(kfd)
	opts := nbdbridge.ConnectOptions{Index: 1000, SizeBytes: 1 << 20, SocketFDs: []int{kfd}, BackendID: backendID(t)}

	_, err := nbdbridge.Connect(opts)
	if !errors.Is(err, nbdbridge.ErrNoDevice) || !strings.Contains(err.Error(), "no such device /dev/nbd1000 (nbds_max=16)") {
		t.Fatalf("Connect(index 1000): %v", err)
	}
	t.Logf("index 1000: %v", err)
	if devs, _ := nbdbridge.ListDevices(); slices.Contains(devs, 1000) {
		t.Fatal("a failed Connect created /dev/nbd1000")
	}

	a := attach(t, newMemServer(1<<20), nbdbridge.ConnectOptions{Index: -1})
	opts.Index = a.idx
	_, err = nbdbridge.Connect(opts)
	if !errors.Is(err, nbdbridge.ErrDeviceBusy) || !strings.Contains(err.Error(), "device "+nbdbridge.DevicePath(a.idx)+" is already in use") {
		t.Fatalf("Connect(busy index): %v", err)
	}
	t.Logf("busy: %v", err)

	free := -1
	st, err := nbdbridge.Status(-1)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		if !s.Connected {
			free = s.Index
			break
		}
	}
	err = nbdbridge.Reconfigure(free, nbdbridge.ReconfigureOptions{BackendID: "x", Timeout: time.Second})
	if !errors.Is(err, nbdbridge.ErrNotConnected) {
		t.Fatalf("Reconfigure(unconnected): %v", err)
	}
	t.Logf("reconfigure unconnected: %v", err)
	if err := nbdbridge.Disconnect(free); !errors.Is(err, nbdbridge.ErrNotConnected) {
		t.Fatalf("Disconnect(unconnected): %v", err)
	}
	if err := nbdbridge.Reconfigure(1000, nbdbridge.ReconfigureOptions{Timeout: time.Second}); !errors.Is(err, nbdbridge.ErrNoDevice) {
		t.Fatalf("Reconfigure(1000): %v", err)
	}
	if _, err := nbdbridge.Status(1000); !errors.Is(err, nbdbridge.ErrNoDevice) {
		t.Fatalf("Status(1000): %v", err)
	}

	// not a socket: the kernel's errno, wrapped with the operation
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	_, err = nbdbridge.Connect(nbdbridge.ConnectOptions{Index: -1, SizeBytes: 1 << 20, SocketFDs: []int{int(r.Fd())}})
	if err == nil || !strings.HasPrefix(err.Error(), "nbd connect") {
		t.Fatalf("Connect(pipe): %v", err)
	}
	t.Logf("pipe as socket: %v", err)
}

// TestDeadConnTimeoutZero: with DeadConnTimeout 0 and the only socket dead,
// I/O fails at once with EIO instead of waiting for a RECONFIGURE.
func TestDeadConnTimeoutZero(t *testing.T) {
	requireNBD(t)
	a := attach(t, newMemServer(4<<20), nbdbridge.ConnectOptions{Index: -1, Timeout: 30 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := nbdbridge.WaitReady(ctx, a.idx, 4<<20); err != nil {
		t.Fatal(err)
	}
	events, err := nbdbridge.WatchLinkDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, nbdbridge.DevicePath(a.idx), os.O_RDONLY)
	a.conn.Close()
	waitLinkDead(t, events, a.idx)
	buf := testutil.AlignedBuf(t, 4096)
	start := time.Now()
	_, err = f.ReadAt(buf, 0)
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("read with every socket dead: %v, want EIO", err)
	}
	t.Logf("EIO after %v; STATUS connected=%v", time.Since(start).Round(time.Microsecond), connected(t, a.idx))
}

// TestMultiConnFallback: with two sockets (CAN_MULTI_CONN) the kernel
// moves I/O to the live socket when one dies.
func TestMultiConnFallback(t *testing.T) {
	requireNBD(t)
	srv := newMemServer(8 << 20)
	c1, k1 := socketPair(t)
	c2, k2 := socketPair(t)
	s1, s2 := make(chan error, 1), make(chan error, 1)
	go func() { s1 <- srv.serve(c1) }()
	go func() { s2 <- srv.serve(c2) }()
	idx, err := nbdbridge.Connect(nbdbridge.ConnectOptions{Index: -1, SizeBytes: 8 << 20,
		ServerFlags: nbdFlagHasFlags | nbdFlagCanMultiConn, Timeout: 30 * time.Second, DeadConnTimeout: 10 * time.Second,
		BackendID: backendID(t), SocketFDs: []int{k1, k2}})
	unix.Close(k1)
	unix.Close(k2)
	if err != nil {
		t.Fatalf("Connect with 2 sockets: %v", err)
	}
	defer func() {
		nbdbridge.Disconnect(idx)
		c2.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := nbdbridge.WaitReady(ctx, idx, 8<<20); err != nil {
		t.Fatal(err)
	}
	events, err := nbdbridge.WatchLinkDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pattern := randomBytes(3, 8<<20)
	srv.fill(0, pattern)
	f := openDirect(t, nbdbridge.DevicePath(idx), os.O_RDONLY)
	buf := testutil.AlignedBuf(t, 1<<20)
	c1.Close()
	waitLinkDead(t, events, idx)
	for off := 0; off < 8<<20; off += 1 << 20 {
		if _, err := f.ReadAt(buf, int64(off)); err != nil {
			t.Fatalf("read at %d with one of two sockets dead: %v", off, err)
		}
		if !bytes.Equal(buf, pattern[off:off+1<<20]) {
			t.Fatalf("read at %d: wrong bytes", off)
		}
	}
	t.Logf("8 MiB read through the surviving socket (reads served: %d)", srv.count(nbdCmdRead))
}

// TestDisconnectOnClose documents the kernel's DISCONNECT_ON_CLOSE: the
// device goes away when its last opener closes it.
func TestDisconnectOnClose(t *testing.T) {
	requireNBD(t)
	a := attach(t, newMemServer(4<<20), nbdbridge.ConnectOptions{Index: -1, Timeout: 30 * time.Second,
		ClientFlags: nbdbridge.ClientFlagDisconnectOnClose})
	waitSize(t, a.idx, 4<<20)
	if !connected(t, a.idx) {
		t.Fatal("not connected before any open")
	}
	f, err := os.Open(nbdbridge.DevicePath(a.idx))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	select {
	case err := <-a.served:
		t.Logf("after the first open+close: serve ended with %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("DISCONNECT_ON_CLOSE: the device stayed connected after its last close")
	}
	waitSize(t, a.idx, 0)
}

// ioTimeout reads the block layer's request timeout of device idx.
func ioTimeout(t *testing.T, idx int) string {
	t.Helper()
	b, err := os.ReadFile("/sys/block/nbd" + strconv.Itoa(idx) + "/queue/io_timeout")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestTimeoutReset: the kernel keeps a device's request timer across
// connections unless CONNECT sets it; Connect always does, so Timeout 0
// means the 30 s default even on a device used with another timeout.
func TestTimeoutReset(t *testing.T) {
	requireNBD(t)
	a := attach(t, newMemServer(1<<20), nbdbridge.ConnectOptions{Index: -1, Timeout: 7 * time.Second})
	if got := ioTimeout(t, a.idx); got != "7000" {
		t.Fatalf("io_timeout with Timeout 7s = %s ms", got)
	}
	if err := nbdbridge.Disconnect(a.idx); err != nil {
		t.Fatal(err)
	}
	waitSize(t, a.idx, 0)
	b := attach(t, newMemServer(1<<20), nbdbridge.ConnectOptions{Index: a.idx})
	if got := ioTimeout(t, b.idx); got != "30000" {
		t.Fatalf("io_timeout with Timeout 0 on a reused device = %s ms, want the 30000 default", got)
	}
}
