package server

import (
	"bytes"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestProxyRefusesRequests checks the rules that close a client
// connection instead of relaying: size > maxPayload, hop count > 60, a
// replication request (0x80) to a proxy without full replication.
func TestProxyRefusesRequests(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "", "maxPrefetch=0\nmaxPayload=262144\n")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	// cached data may be read in any size
	for off := uint64(0); off < 1<<20; off += 262144 {
		getBlock(t, c, off, 262144, 0, 1)
	}
	if _, p := getBlock(t, c, 0, 1<<20, 0, 2); !bytes.Equal(p, ps.data[:1<<20]) {
		t.Fatal("large cached read")
	}
	// (from another address than the uplink's: hop count > 1 from the
	// uplink's address is a cycle)
	c2 := dialFrom(t, ps.proxy.addr, "127.0.0.2")
	handshake(t, c2, "img", 1)
	if _, p := getBlock(t, c2, 1<<20, 4096, 60, 3); !bytes.Equal(p, ps.data[1<<20:1<<20+4096]) {
		t.Fatal("hop count 60 is relayed")
	}
	if r := ps.rec.blocks(); r[len(r)-1].Hops != 61 {
		t.Fatalf("relayed with hops %d, want 61", r[len(r)-1].Hops)
	}
	c3 := dial(t, ps.proxy.addr) // from 127.0.0.1, the uplink's address
	handshake(t, c3, "img", 1)
	send(t, c3, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: 3 << 20, Size: 4096, Hops: 2}, nil)
	expectClosed(t, c3, 5*time.Second)
	for _, req := range []protocol.Request{
		{Cmd: protocol.CmdGetBlock, Offset: 2 << 20, Size: 262145},                                // > maxPayload
		{Cmd: protocol.CmdGetBlock, Offset: 2 << 20, Size: 4096, Hops: 61},                        // too many hops
		{Cmd: protocol.CmdGetBlock, Offset: 2 << 20, Size: 4096, Hops: protocol.HopFlagBgRep | 1}, // BGR without full BGR
	} {
		c := dial(t, ps.proxy.addr)
		handshake(t, c, "img", 1)
		send(t, c, req, nil)
		expectClosed(t, c, 5*time.Second)
	}
	if n := len(ps.rec.blocks()); n != 5 {
		t.Fatalf("%d upstream requests, want 5 (refused requests must not be relayed)", n)
	}
}

// TestProxyHandshakeRules: a peer claiming BG_REP gets only complete
// images from a proxy without full replication; with
// lookupMissingForProxy=false unknown images are not looked up for peers
// that are servers.
func TestProxyHandshakeRules(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "a.r1", 1<<20, false)
	genImage(t, obase, "b.r1", 1<<20, false)
	origin := runServer(t, obase, "", nil, nil)
	pbase := t.TempDir()
	genImage(t, pbase, "full.r1", 65536, false) // complete local image
	proxy := startProxy(t, pbase, "lookupMissingForProxy=false\n", "", nil, origin.addr)

	try := func(name string, flags uint8) bool {
		c := dial(t, proxy.addr)
		_, ok := selectFlags(t, c, name, 1, flags)
		c.Close()
		return ok
	}
	if try("a", protocol.FlagServer) {
		t.Error("unknown image looked up for a server peer with lookupMissingForProxy=false")
	}
	if !try("a", 0) {
		t.Error("unknown image not cloned for a client")
	}
	if !try("a", protocol.FlagServer) {
		t.Error("incomplete image refused to a server peer without BG_REP")
	}
	if try("a", protocol.FlagServer|protocol.FlagBgRep) {
		t.Error("incomplete image served to a BG_REP peer by a proxy without full replication")
	}
	if !try("full", protocol.FlagServer|protocol.FlagBgRep) {
		t.Error("complete image refused to a BG_REP peer")
	}
	// negative lookups are cached: b appears upstream only after the first
	// lookup failed... here: an unknown name stays unknown for 120 s
	if try("nope", 0) {
		t.Error("unknown image")
	}
	start := time.Now()
	if try("nope", 0) || time.Since(start) > time.Second {
		t.Error("negative lookup not cached")
	}
}

// TestProxyQueueFullClosesClient fills the uplink queue (500 fetches):
// the client whose request does not fit is disconnected, the others get
// all their data.
func TestProxyQueueFullClosesClient(t *testing.T) {
	ps := newProxySetup(t, "img", 8<<20, "", "")
	conns := make([]net.Conn, 3)
	for i := range conns {
		conns[i] = dial(t, ps.proxy.addr)
		handshake(t, conns[i], "img", 1)
	}
	getBlock(t, conns[0], 0, 4096, 0, 1) // the uplink is up
	img := loaded(t, ps.proxy.Server, "img", 1)
	up := img.up.Load()
	ps.rec.hold()
	counts := []int{200, 200, 150}
	next := int64(1)
	for i, c := range conns {
		var buf []byte
		for range counts[i] {
			r := protocol.Request{Cmd: protocol.CmdGetBlock, Offset: uint64(next * 8192), Size: 4096, Handle: uint64(next)}.Marshal()
			buf = append(buf, r[:]...)
			next++
		}
		c.Write(buf)
		if i < 2 {
			want := 200 * (i + 1)
			waitFor(t, 5*time.Second, "fetches queued", func() bool {
				up.mu.Lock()
				defer up.mu.Unlock()
				return len(up.fetches) == want
			})
		}
	}
	expectClosed(t, conns[2], 5*time.Second)
	if p := img.Problems(); p&problemUplinkQueued == 0 {
		t.Errorf("problems %d while the queue is full", p)
	}
	ps.rec.release()
	for i, c := range conns[:2] {
		for range 200 {
			rep, p := readReply(t, c)
			off := int64(rep.Handle) * 8192
			if rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, ps.data[off:off+4096]) {
				t.Fatalf("conn %d: reply %v", i, rep)
			}
		}
	}
}

// TestProxyStopsReadingAbove250Relays: a client with more than 250
// relayed requests outstanding is not read from until some complete, and
// is disconnected if none complete within clientTimeout.
func TestProxyStopsReadingAbove250Relays(t *testing.T) {
	ps := newProxySetup(t, "img", 8<<20, "clientTimeout=1500\n", "")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	getBlock(t, c, 0, 4096, 0, 1)
	img := loaded(t, ps.proxy.Server, "img", 1)
	up := img.up.Load()
	fetches := func() int {
		up.mu.Lock()
		defer up.mu.Unlock()
		return len(up.fetches)
	}
	send300 := func(c net.Conn, base int64) {
		var buf []byte
		for i := int64(0); i < 300; i++ {
			r := protocol.Request{Cmd: protocol.CmdGetBlock, Offset: uint64((base + i) * 8192), Size: 4096, Handle: uint64(base + i)}.Marshal()
			buf = append(buf, r[:]...)
		}
		go c.Write(buf)
	}
	ps.rec.hold()
	send300(c, 1)
	waitFor(t, 5*time.Second, "251 fetches", func() bool { return fetches() == 251 })
	time.Sleep(300 * time.Millisecond)
	if n := fetches(); n != 251 {
		t.Fatalf("%d fetches: the proxy kept reading", n)
	}
	ps.rec.release()
	for range 300 {
		rep, p := readReply(t, c)
		off := int64(rep.Handle) * 8192
		if rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, ps.data[off:off+4096]) {
			t.Fatalf("reply %v", rep)
		}
	}
	// now stalled for longer than clientTimeout: disconnected
	ps.rec.hold()
	send300(c, 400)
	start := time.Now()
	expectClosed(t, c, 10*time.Second)
	if d := time.Since(start); d < time.Second {
		t.Errorf("closed after %v, before clientTimeout", d)
	}
	ps.rec.release()
}

// TestProxyRelayFailsForGood: when the uplink is gone for good, a relayed
// request gets CMD_ERROR with its handle and the connection is shut down;
// cached data was served until then.
func TestProxyRelayFailsForGood(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "uplinkTimeout=300\n", "")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	getBlock(t, c, 0, 65536, 0, 1)
	ps.rec.close()
	if _, p := getBlock(t, c, 4096, 4096, 0, 2); !bytes.Equal(p, ps.data[4096:8192]) {
		t.Fatal("cached read")
	}
	start := time.Now()
	rep, _ := getBlock(t, c, 1<<20, 4096, 0, 0x77)
	if rep.Cmd != protocol.CmdError || rep.Handle != 0x77 {
		t.Fatalf("reply %v, want CMD_ERROR with handle 0x77", rep)
	}
	expectClosed(t, c, 5*time.Second)
	t.Logf("CMD_ERROR after %v", time.Since(start))
	if p := loaded(t, ps.proxy.Server, "img", 1).Problems(); p&problemNoUplink == 0 {
		t.Errorf("problems %d without uplink", p)
	}
}

// TestProxyPenalties: an incomplete image without uplink delays the
// handshake by (100 - complete%) × 100 µs; a write problem adds 100 ms and
// rejects about 3 of 4 connections.
func TestProxyPenalties(t *testing.T) {
	base := t.TempDir()
	if _, err := CreateImage(base, "pen", 1, 1<<20, true, false); err != nil {
		t.Fatal(err)
	}
	// the only uplink does not listen
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	l.Close()
	proxy := startProxy(t, base, "", "", nil, dead)
	c := dial(t, proxy.addr)
	start := time.Now()
	handshake(t, c, "pen", 1)
	if d := time.Since(start); d < 10*time.Millisecond {
		t.Errorf("handshake took %v, want >= 10 ms (0%% complete, no uplink)", d)
	}
	if p := loaded(t, proxy.Server, "pen", 1).Problems(); p != problemNoUplink {
		t.Errorf("problems %d", p)
	}
	img := loaded(t, proxy.Server, "pen", 1)
	img.problems.Or(problemWrite)
	var ok, refused atomic.Int32
	var wg sync.WaitGroup
	for range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", proxy.addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			start := time.Now()
			p := protocol.SelectImage{Version: 3, Name: "pen", RID: 1}.Marshal()
			h := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
			c.Write(append(h[:], p...))
			var hdr [protocol.ReplySize]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				refused.Add(1)
				return
			}
			if d := time.Since(start); d < 100*time.Millisecond {
				t.Errorf("accepted after %v, want >= 100 ms with a write problem", d)
			}
			ok.Add(1)
		}()
	}
	wg.Wait()
	if ok.Load() < 1 || ok.Load() > 25 {
		t.Errorf("%d of 40 connections accepted with a write problem, want about 10", ok.Load())
	}
}

// TestProxyCycleDoesNotLoop: two proxies that are each other's uplink
// and both lack a block. The relayed request comes back with hop count 2
// from the uplink's address and is refused; the client gets CMD_ERROR in
// bounded time instead of a request circling forever. An image neither
// has is refused at once (the second lookup sees the first in flight).
func TestProxyCycleDoesNotLoop(t *testing.T) {
	ports := make([]net.Listener, 2)
	for i := range ports {
		ports[i], _ = net.Listen("tcp", "127.0.0.1:0")
	}
	addrs := []string{ports[0].Addr().String(), ports[1].Addr().String()}
	for _, l := range ports {
		l.Close()
	}
	var srv [2]*tsrv
	for i := range srv {
		base := t.TempDir()
		if _, err := CreateImage(base, "cyc", 1, 1<<20, true, false); err != nil {
			t.Fatal(err)
		}
		srv[i] = runServerAt(t, addrs[i], base, proxyConf+"uplinkTimeout=300\n", map[string]string{"alt-servers": altServersFor(addrs[1-i])}, nil)
	}
	c := dial(t, addrs[0])
	handshake(t, c, "cyc", 1)
	start := time.Now()
	rep, _ := getBlock(t, c, 0, 4096, 0, 9)
	if rep.Cmd != protocol.CmdError || rep.Handle != 9 {
		t.Fatalf("reply %v, want CMD_ERROR", rep)
	}
	t.Logf("cycle ended with CMD_ERROR after %v", time.Since(start))

	c2 := dial(t, addrs[0])
	start = time.Now()
	if _, ok := selectFlags(t, c2, "neither", 1, 0); ok {
		t.Fatal("image nobody has was served")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("lookup in a cycle took %v", d)
	}
	// both still work
	for _, s := range srv {
		queryJSON(t, s.addr, "q=stats", nil)
	}
}

// dialFrom connects to addr from the local address from (another
// loopback address than the uplink's 127.0.0.1).
func dialFrom(t *testing.T, addr, from string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

// TestProxyRelayFailsForGoodNBD: as TestProxyRelayFailsForGood on a
// connection switched to NBD mode: no error reply (the application would
// see EIO), the connection is closed so that the kernel re-sends the read
// on another one.
func TestProxyRelayFailsForGoodNBD(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "uplinkTimeout=300\n", "")
	c := dial(t, ps.proxy.addr)
	switchNBD(t, c, "img")
	nbdReq(t, c, protocol.NBDCmdRead, 1, 0, 65536, nil)
	if errno, _, data := nbdReply(t, c, 65536); errno != 0 || !bytes.Equal(data, ps.data[:65536]) {
		t.Fatalf("relayed read: errno %d", errno)
	}
	ps.rec.close()
	nbdReq(t, c, protocol.NBDCmdRead, 2, 4096, 4096, nil)
	if errno, _, data := nbdReply(t, c, 4096); errno != 0 || !bytes.Equal(data, ps.data[4096:8192]) {
		t.Fatalf("cached read: errno %d", errno)
	}
	nbdReq(t, c, protocol.NBDCmdRead, 3, 1<<20, 4096, nil)
	expectClosed(t, c, 5*time.Second)
}
