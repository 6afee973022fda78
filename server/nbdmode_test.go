package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// switchNBD performs SELECT_IMAGE with FlagFeatures and CmdNBDMode on c.
func switchNBD(t *testing.T, c net.Conn, name string) protocol.SelectImageReply {
	t.Helper()
	sel, ok := selectFlags(t, c, name, 0, protocol.FlagFeatures)
	if !ok || sel.Features&protocol.FeatureNBD == 0 {
		t.Fatalf("handshake with FlagFeatures: ok %v, %+v", ok, sel)
	}
	send(t, c, protocol.Request{Cmd: protocol.CmdNBDMode, Handle: 77}, nil)
	rep, p := readReply(t, c)
	if rep.Cmd != protocol.CmdNBDMode || rep.Handle != 77 || len(p) != 0 {
		t.Fatalf("switch reply %v", rep)
	}
	return sel
}

// nbdReq sends an NBD request (and payload).
func nbdReq(t *testing.T, c net.Conn, typ uint16, cookie, off uint64, n uint32, payload []byte) {
	t.Helper()
	var b [protocol.NBDRequestSize]byte
	(&protocol.NBDRequest{Type: typ, Cookie: cookie, Offset: off, Length: n}).MarshalTo(b[:])
	if _, err := c.Write(append(b[:], payload...)); err != nil {
		t.Fatal(err)
	}
}

// nbdReply reads a reply header and, for a successful read of n bytes,
// its data.
func nbdReply(t *testing.T, c net.Conn, n uint32) (errno uint32, cookie uint64, data []byte) {
	t.Helper()
	var h [protocol.NBDReplySize]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatalf("read NBD reply: %v", err)
	}
	errno, cookie, err := protocol.ParseNBDReply(h[:])
	if err != nil {
		t.Fatal(err)
	}
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		if _, err := io.ReadFull(c, data); err != nil {
			t.Fatalf("read %d bytes of data: %v", n, err)
		}
	}
	return errno, cookie, data
}

// TestNBDModeServesImage switches a connection to NBD and checks reads
// (pipelined, unaligned, zero padding past the file), the errors of the
// other commands, and that a plain client's handshake is unchanged.
func TestNBDModeServesImage(t *testing.T) {
	base := t.TempDir()
	const fileSize = 3<<20 + 1000 // virtual size pads to 4 KiB
	testutil.WriteGenImage(t, filepath.Join(base, "img.r1"), fileSize)
	want := append(testutil.GenImage(0, fileSize), make([]byte, protocol.VirtualSize(fileSize)-fileSize)...)
	ts := startServer(t, base, "", nil)

	// Without the flag: the reply the reference sends, no mask.
	plain := dial(t, ts.addr)
	if sel, ok := selectFlags(t, plain, "img", 0, 0); !ok || sel.Features != 0 {
		t.Fatalf("plain handshake: %+v", sel)
	}

	c := dial(t, ts.addr)
	sel := switchNBD(t, c, "img")
	if sel.Size != uint64(len(want)) {
		t.Fatalf("size %d", sel.Size)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	type rd struct {
		off uint64
		n   uint32
	}
	reads := map[uint64]rd{}
	for k := range 64 { // all in flight at once
		n := uint32(1 + rng.IntN(300<<10))
		off := uint64(rng.Int64N(int64(len(want)) - int64(n)))
		if k == 0 {
			off, n = uint64(len(want))-5000, 5000 // the padded tail
		}
		reads[uint64(k)+1000] = rd{off, n}
		nbdReq(t, c, protocol.NBDCmdRead, uint64(k)+1000, off, n, nil)
	}
	for range len(reads) {
		var h [protocol.NBDReplySize]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			t.Fatal(err)
		}
		errno, cookie, _ := protocol.ParseNBDReply(h[:])
		r, ok := reads[cookie]
		if !ok || errno != 0 {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		data := make([]byte, r.n)
		if _, err := io.ReadFull(c, data); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, want[r.off:r.off+uint64(r.n)]) {
			t.Fatalf("data of read %d at %d differs", r.n, r.off)
		}
		delete(reads, cookie)
	}

	cases := []struct {
		name    string
		typ     uint16
		off     uint64
		n       uint32
		payload []byte
		errno   uint32
	}{
		{"read past the end", protocol.NBDCmdRead, uint64(len(want)) - 10, 4096, nil, protocol.NBDEINVAL},
		{"read wrapping", protocol.NBDCmdRead, 1<<64 - 100, 4096, nil, protocol.NBDEINVAL},
		{"read too large", protocol.NBDCmdRead, 0, 64 << 20, nil, protocol.NBDEINVAL},
		{"empty read", protocol.NBDCmdRead, 0, 0, nil, 0},
		{"flush", protocol.NBDCmdFlush, 0, 0, nil, 0},
		{"write", protocol.NBDCmdWrite, 0, 5, []byte("hello"), protocol.NBDEPERM},
		{"trim", protocol.NBDCmdTrim, 0, 4096, nil, protocol.NBDEPERM},
		{"unknown", 99, 0, 0, nil, protocol.NBDEINVAL},
	}
	for k, cs := range cases {
		nbdReq(t, c, cs.typ, uint64(k), cs.off, cs.n, cs.payload)
		errno, cookie, _ := nbdReply(t, c, 0)
		if errno != cs.errno || cookie != uint64(k) {
			t.Errorf("%s: errno %d cookie %d, want %d %d", cs.name, errno, cookie, cs.errno, k)
		}
	}
	// still in sync after all that
	nbdReq(t, c, protocol.NBDCmdRead, 9, 8192, 4096, nil)
	if errno, _, data := nbdReply(t, c, 4096); errno != 0 || !bytes.Equal(data, want[8192:12288]) {
		t.Fatalf("read after the errors: %d", errno)
	}
	// no idle timeout in NBD mode (the kernel sends no keepalives): a
	// DNBD3 client would be dropped after 4 client timeouts
	c.SetDeadline(time.Now().Add(20 * time.Second))
	nbdReq(t, c, protocol.NBDCmdDisc, 0, 0, 0, nil)
	expectClosed(t, c, 5*time.Second)

	// garbage closes the connection
	g := dial(t, ts.addr)
	switchNBD(t, g, "img")
	g.Write(make([]byte, protocol.NBDRequestSize))
	expectClosed(t, g, 5*time.Second)
}

// TestNBDModeIdle: a switched connection outlives the DNBD3 idle timeout.
func TestNBDModeIdle(t *testing.T) {
	base := t.TempDir()
	testutil.WriteGenImage(t, filepath.Join(base, "img.r1"), 1<<20)
	ts := startServer(t, base, "clientTimeout=300\n", nil)
	c := dial(t, ts.addr)
	switchNBD(t, c, "img")
	time.Sleep(1500 * time.Millisecond) // > 4 × 300 ms
	nbdReq(t, c, protocol.NBDCmdRead, 1, 0, 4096, nil)
	if errno, _, data := nbdReply(t, c, 4096); errno != 0 || !bytes.Equal(data, testutil.GenImage(0, 4096)) {
		t.Fatalf("read after idling: errno %d", errno)
	}
}

// TestNBDModeRefused: a server that cannot serve every block of the image
// refuses the switch with CMD_ERROR and the connection stays DNBD3.
func TestNBDModeRefused(t *testing.T) {
	base := t.TempDir()
	testutil.WriteGenImage(t, filepath.Join(base, "img.r1"), 1<<20)
	ts := startServer(t, base, "", nil)
	img, err := ts.store.get("img", 1)
	if err != nil {
		t.Fatal(err)
	}
	img.hasBad.Store(true)
	defer func() { img.hasBad.Store(false); ts.store.Release(img) }()
	c := dial(t, ts.addr)
	if sel, ok := selectFlags(t, c, "img", 0, protocol.FlagFeatures); !ok || sel.Features != protocol.FeatureNBD {
		t.Fatalf("handshake %+v", sel)
	}
	send(t, c, protocol.Request{Cmd: protocol.CmdNBDMode, Handle: 5}, nil)
	if rep, _ := readReply(t, c); rep.Cmd != protocol.CmdError || rep.Handle != 5 {
		t.Fatalf("refusal %v", rep)
	}
	send(t, c, protocol.Request{Cmd: protocol.CmdKeepalive}, nil)
	if rep, _ := readReply(t, c); rep.Cmd != protocol.CmdKeepalive {
		t.Fatalf("after the refusal: %v", rep)
	}
}

// TestNBDModeThroughProxy: a proxy whose copy is empty serves a switched
// connection by relaying the absent blocks through its uplink.
func TestNBDModeThroughProxy(t *testing.T) {
	origin := runServer(t, t.TempDir(), "", nil, nil)
	want := genImage(t, origin.base, "p.r1", 2<<20, true)
	proxy := startProxy(t, "", "", "", nil, origin.addr)
	c := dial(t, proxy.addr)
	switchNBD(t, c, "p")
	for k, off := range []uint64{0, 1 << 20, 4096 * 7, 0} {
		nbdReq(t, c, protocol.NBDCmdRead, uint64(k), off, 64<<10, nil)
		errno, cookie, data := nbdReply(t, c, 64<<10)
		if errno != 0 || cookie != uint64(k) || !bytes.Equal(data, want[off:off+64<<10]) {
			t.Fatalf("read %d at %d through the proxy: errno %d", k, off, errno)
		}
	}
}

// TestDialNBDFollowsImage: the client library's DialNBD skips a server
// without the feature (the fake server, like a reference one) and opens
// every connection to one that switches; the kernel's reads then work on
// them. With only servers that lack the feature it reports ErrNoNBD.
func TestDialNBDFollowsImage(t *testing.T) {
	base := t.TempDir()
	want := genImage(t, base, "d.r1", 4<<20, false)
	ours := startServer(t, base, "", nil)
	fake := dnbd3test.Start(t, dnbd3test.Image{Name: "d", RID: 1, Data: want})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	img, err := client.Open(ctx, client.Config{Servers: []string{fake.Addr(), ours.addr}, Image: "d", NoProbe: true,
		OpenStagger: -1, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	conns, srv, err := img.DialNBD(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	if srv != ours.addr || len(conns) != 3 {
		t.Fatalf("DialNBD chose %s with %d connections, want %s", srv, len(conns), ours.addr)
	}
	for k, c := range conns {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		off := uint64(k) * 1 << 20
		nbdReq(t, c, protocol.NBDCmdRead, uint64(k), off, 8192, nil)
		if errno, _, data := nbdReply(t, c, 8192); errno != 0 || !bytes.Equal(data, want[off:off+8192]) {
			t.Fatalf("connection %d: errno %d or wrong data", k, errno)
		}
	}
	onlyFake, err := client.Open(ctx, client.Config{Servers: []string{fake.Addr()}, Image: "d", NoProbe: true, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer onlyFake.Close()
	if _, _, err := onlyFake.DialNBD(ctx, 1); !errors.Is(err, client.ErrNoNBD) {
		t.Fatalf("DialNBD without a capable server: %v", err)
	}
}

// TestReferenceServerIgnoresFeatureFlag runs the reference dnbd3-server
// (../shared/peers/dnbd3-ref): a SELECT_IMAGE with FlagFeatures is served
// as usual (the bit is ignored, no mask follows), so DialNBD reports
// ErrNoNBD and the daemon keeps relaying, and reads over DNBD3 work.
func TestReferenceServerIgnoresFeatureFlag(t *testing.T) {
	bin := filepath.Join(testutil.SharedDir(t), "peers", "dnbd3-ref", "dnbd3-server")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("SKIP: the reference server is missing: %v", err)
	}
	base, etc := t.TempDir(), t.TempDir()
	want := genImage(t, base, "r.r1", 1<<20, false)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nlistenPort="+port+"\n"), 0o644)
	cmd := exec.Command(bin, "-n", "-c", etc)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Skipf("SKIP: the reference server does not run here: %v", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
		t.Fatalf("reference server does not listen: %v\n%s", err, out.String())
	}
	c := dial(t, addr)
	sel, ok := selectFlags(t, c, "r", 0, protocol.FlagFeatures|protocol.FlagServer)
	if !ok || sel.Features != 0 || sel.Size != uint64(len(want)) || sel.RID != 1 {
		t.Fatalf("reference server's answer to FlagFeatures: ok %v %+v", ok, sel)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	img, err := client.Open(ctx, client.Config{Servers: []string{addr}, Image: "r", NoProbe: true, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, _, err := img.DialNBD(ctx, 2); !errors.Is(err, client.ErrNoNBD) {
		t.Fatalf("DialNBD against the reference server: %v", err)
	}
	buf := make([]byte, 64<<10)
	if _, err := img.ReadAt(buf, 4096); err != nil || !bytes.Equal(buf, want[4096:4096+len(buf)]) {
		t.Fatalf("read from the reference server after the probe: %v", err)
	}
}

// TestNBDModeClosesOnBadHashBlock: once a hash block of the image failed
// its check, a switched connection's READ of it gets no error reply (the
// application would see EIO) but the connection is closed, so that the
// kernel re-sends the read on another one.
func TestNBDModeClosesOnBadHashBlock(t *testing.T) {
	base := t.TempDir()
	testutil.WriteGenImage(t, filepath.Join(base, "img.r1"), 1<<20)
	ts := startServer(t, base, "", nil)
	img, err := ts.store.get("img", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer ts.store.Release(img)
	c := dial(t, ts.addr)
	switchNBD(t, c, "img")
	nbdReq(t, c, protocol.NBDCmdRead, 1, 0, 4096, nil)
	if errno, _, data := nbdReply(t, c, 4096); errno != 0 || !bytes.Equal(data, testutil.GenImage(0, 4096)) {
		t.Fatalf("read before the failed check: errno %d", errno)
	}
	img.markBad(0)
	defer img.markGood(0)
	nbdReq(t, c, protocol.NBDCmdRead, 2, 8192, 4096, nil)
	expectClosed(t, c, 5*time.Second)
}
