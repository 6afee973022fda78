package server

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// proxySetup is an origin serving one generator image, a recorder in
// front of it and a proxy using the recorder as its uplink.
type proxySetup struct {
	origin *tsrv
	rec    *recorder
	proxy  *tsrv
	data   []byte // the image, padded to its virtual size
}

func newProxySetup(t *testing.T, name string, size int64, conf, limits string) *proxySetup {
	t.Helper()
	obase := t.TempDir()
	data := genImage(t, obase, name+".r1", size, true)
	origin := runServer(t, obase, "", nil, nil)
	rec := startRecorder(t, origin.addr)
	proxy := startProxy(t, "", conf, limits, nil, rec.addr())
	return &proxySetup{origin: origin, rec: rec, proxy: proxy, data: data}
}

func TestProxyDedupConcurrentClients(t *testing.T) {
	ps := newProxySetup(t, "img", 8<<20, "", "")
	ci := openClient(t, ps.proxy.addr, "img", 1, 0) // clones the image
	expectRead(t, ci, ps.data, 0, 4096)
	before := len(ps.rec.blocks())

	const n = 8
	const off, size = 1 << 20, 256 << 10
	ps.rec.hold()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = dial(t, ps.proxy.addr)
		handshake(t, conns[i], "img", 1)
	}
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// the first client asks for the whole range, the others for
			// parts of it: all attach to the first fetch
			o, s := uint64(off), uint32(size)
			if i > 0 {
				o += uint64(i) * 4096
				s = 8192
			}
			req := protocol.Request{Cmd: protocol.CmdGetBlock, Offset: o, Size: s, Handle: uint64(i)}.Marshal()
			if _, err := c.Write(req[:]); err != nil {
				errs <- err
			}
		}()
		if i == 0 {
			waitFor(t, 5*time.Second, "the first relayed request upstream", func() bool { return len(ps.rec.blocks()) > before })
		}
	}
	wg.Wait()
	time.Sleep(100 * time.Millisecond) // let the proxy read them all
	ps.rec.release()
	for i, c := range conns {
		rep, p := readReply(t, c)
		o, s := int64(off), int64(size)
		if i > 0 {
			o += int64(i) * 4096
			s = 8192
		}
		if rep.Handle != uint64(i) || !bytes.Equal(p, ps.data[o:o+s]) {
			t.Fatalf("client %d: reply %v, data ok %v", i, rep, bytes.Equal(p, ps.data[o:o+s]))
		}
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := ps.rec.blocks()[before:]
	if len(got) != 1 || got[0].Offset != off || got[0].Size != size || got[0].Hops != 1 {
		t.Fatalf("upstream requests %v, want one of %d bytes at %d with hops 1", got, size, off)
	}
}

// TestProxyRepliesOutOfOrder pipelines an uncached and a cached request
// on one connection: the cached one is answered while the other waits
// for the uplink.
func TestProxyRepliesOutOfOrder(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "", "")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	if _, p := getBlock(t, c, 0, 65536, 0, 1); !bytes.Equal(p, ps.data[:65536]) {
		t.Fatal("first read")
	}
	ps.rec.hold()
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: 2 << 20, Size: 65536, Handle: 2}, nil)
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: 4096, Size: 8192, Handle: 3}, nil)
	send(t, c, protocol.Request{Cmd: protocol.CmdKeepalive}, nil)
	rep, p := readReply(t, c)
	if rep.Handle != 3 || !bytes.Equal(p, ps.data[4096:12288]) {
		t.Fatalf("first reply %v, want the cached request 3", rep)
	}
	if rep, _ = readReply(t, c); rep.Cmd != protocol.CmdKeepalive {
		t.Fatalf("second reply %v, want KEEPALIVE", rep)
	}
	ps.rec.release()
	rep, p = readReply(t, c)
	if rep.Handle != 2 || !bytes.Equal(p, ps.data[2<<20:2<<20+65536]) {
		t.Fatalf("relayed reply %v", rep)
	}
}

func TestProxyPrefetch(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "", "maxPrefetch=262144\n")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	const off = 1 << 20
	if _, p := getBlock(t, c, off, 65536, 0, 1); !bytes.Equal(p, ps.data[off:off+65536]) {
		t.Fatal("read")
	}
	img := loaded(t, ps.proxy.Server, "img", 1)
	waitFor(t, 5*time.Second, "prefetch", func() bool { return img.cache.Load().has(off, off+4*65536) })
	got := sortedByOffset(ps.rec.blocks())
	want := []protocol.Request{
		{Cmd: protocol.CmdGetBlock, Offset: off, Size: 65536, Hops: 1},
		{Cmd: protocol.CmdGetBlock, Offset: off + 65536, Size: 3 * 65536, Hops: 0x41},
	}
	if len(got) != 2 || got[0].Offset != want[0].Offset || got[0].Size != want[0].Size || got[0].Hops != want[0].Hops ||
		got[1].Offset != want[1].Offset || got[1].Size != want[1].Size || got[1].Hops != want[1].Hops {
		t.Fatalf("upstream %v, want %v", got, want)
	}
	// the prefetched range is served locally
	if _, p := getBlock(t, c, off+65536, 3*65536, 0, 2); !bytes.Equal(p, ps.data[off+65536:off+4*65536]) {
		t.Fatal("prefetched read")
	}
	if n := len(ps.rec.blocks()); n != 2 {
		t.Fatalf("%d upstream requests after reading prefetched data", n)
	}
	// at most maxPrefetch, and never after a prefetch request (no cascading)
	if _, p := getBlock(t, c, 2<<20, 200000, 0, 3); !bytes.Equal(p, ps.data[2<<20:2<<20+200000]) {
		t.Fatal("read 3")
	}
	if _, p := getBlock(t, c, 3<<20, 4096, protocol.HopFlagPrefetch, 4); !bytes.Equal(p, ps.data[3<<20:3<<20+4096]) {
		t.Fatal("read 4")
	}
	waitFor(t, 5*time.Second, "prefetch 2", func() bool { return len(ps.rec.blocks()) >= 4 })
	time.Sleep(100 * time.Millisecond)
	got = sortedByOffset(ps.rec.blocks()[2:])
	if len(got) != 3 || got[1].Offset != 2<<20+200704 || got[1].Size != 262144 || got[1].Hops != 0x41 ||
		got[2].Offset != 3<<20 || got[2].Size != 4096 || got[2].Hops != 0x41 {
		t.Fatalf("upstream %v", got)
	}
}

func TestProxyMinRequestSize(t *testing.T) {
	ps := newProxySetup(t, "img", 1<<20, "", "maxPrefetch=0\nminRequestSize=65536\n")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	if _, p := getBlock(t, c, 5000, 100, 0, 1); !bytes.Equal(p, ps.data[5000:5100]) {
		t.Fatal("read")
	}
	// near the end: clipped to the image
	if _, p := getBlock(t, c, 1<<20-4096, 4096, 0, 2); !bytes.Equal(p, ps.data[1<<20-4096:]) {
		t.Fatal("read at the end")
	}
	got := ps.rec.blocks()
	if len(got) != 2 || got[0].Offset != 4096 || got[0].Size != 65536 || got[1].Offset != 1<<20-4096 || got[1].Size != 4096 {
		t.Fatalf("upstream %v", got)
	}
}

// TestProxyChain reads through origin -> proxy A -> proxy B: the origin
// sees the client's request with hop count 2.
func TestProxyChain(t *testing.T) {
	ps := newProxySetup(t, "img", 2<<20, "", "")
	b := startProxy(t, "", "", "", nil, ps.proxy.addr)
	ci := openClient(t, b.addr, "img", 0, 10*time.Second)
	if ci.RID() != 1 || ci.Size() != 2<<20 {
		t.Fatalf("rid %d size %d", ci.RID(), ci.Size())
	}
	expectRead(t, ci, ps.data, 123456, 70000)
	var found bool
	for _, r := range ps.rec.blocks() {
		if r.Offset == 122880 && r.Size == 73728 && r.Hops == 2 {
			found = true
		}
	}
	if !found {
		t.Fatalf("origin requests %v: no hops-2 request for the client's range", ps.rec.blocks())
	}
	// A cached it too: reading it from A needs no upstream request
	n := len(ps.rec.blocks())
	ca := openClient(t, ps.proxy.addr, "img", 1, 10*time.Second)
	expectRead(t, ca, ps.data, 122880, 73728)
	if len(ps.rec.blocks()) != n {
		t.Fatal("A fetched again what it relayed for B")
	}
}

// TestProxyRandomReads reads random ranges through the proxy from several
// clients at once (overlapping relays, prefetch, partial dedup) and checks
// every byte, then that the proxy's file holds what its map says.
func TestProxyRandomReads(t *testing.T) {
	const size = 24<<20 + 12345
	ps := newProxySetup(t, "img", size, "", "maxPrefetch=65536\nminRequestSize=8192\n")
	rng := rand.New(rand.NewPCG(7, 8))
	seeds := make([]uint64, 6)
	for i := range seeds {
		seeds[i] = rng.Uint64()
	}
	var wg sync.WaitGroup
	for k := range seeds {
		ci := openClient(t, ps.proxy.addr, "img", 1, 20*time.Second)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var inner sync.WaitGroup
			for j := range 4 {
				inner.Add(1)
				go func() {
					defer inner.Done()
					r := rand.New(rand.NewPCG(seeds[k], uint64(j)))
					for range 30 {
						off := r.Int64N(int64(len(ps.data)) - 1)
						n := min(1+r.Int64N(60000), int64(len(ps.data))-off)
						buf := make([]byte, n)
						if _, err := ci.ReadAtContext(context.Background(), buf, off); err != nil {
							t.Errorf("read %d at %d: %v", n, off, err)
							return
						}
						if !bytes.Equal(buf, ps.data[off:off+n]) {
							t.Errorf("read %d at %d: wrong data", n, off)
							return
						}
					}
				}()
			}
			inner.Wait()
		}()
	}
	wg.Wait()
	img := loaded(t, ps.proxy.Server, "img", 1)
	cm := img.cache.Load()
	if cm == nil {
		t.Fatal("image complete?")
	}
	waitFor(t, 5*time.Second, "fetches to settle", func() bool {
		up := img.up.Load()
		if up == nil {
			return true
		}
		up.mu.Lock()
		defer up.mu.Unlock()
		return len(up.fetches) == 0
	})
	local := readFile(t, filepath.Join(ps.proxy.base, "img.r1"))
	for b := int64(0); b < cm.Blocks(); b++ {
		if cm.has(b*4096, b*4096+4096) && !bytes.Equal(local[b*4096:b*4096+4096], ps.data[b*4096:b*4096+4096]) {
			t.Fatalf("block %d marked present but wrong", b)
		}
	}
	t.Logf("cached %d%%, %d upstream requests, %d bytes", cm.percent(), len(ps.rec.blocks()), ps.rec.blockBytes())
}

// sortedByOffset sorts requests by offset: fetches started together (a
// client request and its prefetch) may leave in either order.
func sortedByOffset(list []protocol.Request) []protocol.Request {
	slices.SortFunc(list, func(a, b protocol.Request) int { return int(int64(a.Offset) - int64(b.Offset)) })
	return list
}
