package server

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
	"golang.org/x/sys/unix"
)

// rpcUplinkServer returns the RPC's images[].uplinkServer of name:rid on
// the server at addr ("" if the image has no uplink).
func rpcUplinkServer(t *testing.T, addr, name string, rid uint16) string {
	t.Helper()
	var q struct {
		Images []struct {
			Name         string
			Rid          int
			UplinkServer string
		}
	}
	queryJSON(t, addr, "q=images", &q)
	for _, im := range q.Images {
		if im.Name == name && im.Rid == int(rid) {
			return im.UplinkServer
		}
	}
	return ""
}

// sawBlock reports whether r recorded a relayed GET_BLOCK of exactly
// [off, off+size).
func sawBlock(r *recorder, off uint64, size uint32) bool {
	for _, q := range r.blocks() {
		if q.Offset == off && q.Size == size {
			return true
		}
	}
	return false
}

// TestUplinkFailoverResendsPending: a proxy with two uplink servers
// serving the same image relays client reads; the uplink server in use
// dies while relayed requests are pending there. The uplink fails over to
// the other server, re-sends the pending requests there, every client
// read completes with the right data, and RPC shows the other server.
func TestUplinkFailoverResendsPending(t *testing.T) {
	const size = 8 << 20
	var data []byte
	var origins [2]*tsrv
	var recs [2]*recorder
	for i := range origins {
		base := t.TempDir()
		data = genImage(t, base, "img.r1", size, true) // identical on both
		origins[i] = runServer(t, base, "", nil, nil)
		recs[i] = startRecorder(t, origins[i].addr)
	}
	proxy := startProxy(t, "", "", "", nil, recs[0].addr(), recs[1].addr())
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	// the stream starts normally
	for k := range 4 {
		off := uint64(k) * 65536
		if rep, p := getBlock(t, c, off, 65536, 0, uint64(k+1)); rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, data[off:off+65536]) {
			t.Fatalf("read %d before the failure: %v", k, rep)
		}
	}
	img := loaded(t, proxy.Server, "img", 1)
	up := img.up.Load()
	if up == nil || up.ci == nil {
		t.Fatal("no uplink after relayed reads")
	}

	// Hold every reply of both servers, so whatever the uplink sends
	// stays pending; released at the latest when the test ends (before
	// the recorders close).
	held := [2]bool{true, true}
	recs[0].hold()
	recs[1].hold()
	release := func(i int) {
		if held[i] {
			held[i] = false
			recs[i].release()
		}
	}
	t.Cleanup(func() { release(0); release(1) })

	const n = 8
	type rd struct {
		off  uint64
		size uint32
	}
	var reads [n]rd
	var batch []byte
	for k := range reads {
		reads[k] = rd{off: 1<<20 + uint64(k)*(512<<10), size: 65536}
		hdr := protocol.Request{Cmd: protocol.CmdGetBlock, Offset: reads[k].off, Size: reads[k].size, Handle: uint64(100 + k)}.Marshal()
		batch = append(batch, hdr[:]...)
	}
	if _, err := c.Write(batch); err != nil {
		t.Fatal(err)
	}
	allSeen := func(r *recorder) bool {
		for _, q := range reads {
			if !sawBlock(r, q.off, q.size) {
				return false
			}
		}
		return true
	}
	waitFor(t, 10*time.Second, "the relayed requests to reach an uplink server", func() bool {
		return allSeen(recs[0]) || allSeen(recs[1])
	})
	victim := 0
	if !allSeen(recs[0]) {
		victim = 1
	}
	other := 1 - victim
	if cur := up.server(); cur != recs[victim].addr() {
		t.Logf("uplink's current server %q, requests pending at %s", cur, recs[victim].addr())
	}
	if st := up.ci.Stats(); st.Pending < n {
		t.Fatalf("%d reads pending in the uplink before the failure, want at least %d", st.Pending, n)
	}

	// The server dies: its address refuses connections, the open ones
	// break without another byte of reply, the origin behind it stops.
	recs[victim].ln.Close()
	recs[victim].dropConns()
	release(victim)
	origins[victim].stop()
	release(other)

	got := map[uint64][]byte{}
	for range n {
		rep, p := readReply(t, c)
		if rep.Cmd != protocol.CmdGetBlock {
			t.Fatalf("reply %v after the failover, want data", rep)
		}
		got[rep.Handle] = p
	}
	for k, q := range reads {
		p, ok := got[uint64(100+k)]
		if !ok || !bytes.Equal(p, data[q.off:q.off+uint64(q.size)]) {
			t.Errorf("read %d (%d bytes at %d): wrong or missing data after the failover", k, q.size, q.off)
		}
	}
	// the pending requests were re-sent to the other server unchanged
	for _, q := range reads {
		if !sawBlock(recs[other], q.off, q.size) {
			t.Errorf("request of %d bytes at %d not re-sent to %s", q.size, q.off, recs[other].addr())
		}
	}
	if st := up.ci.Stats(); st.Failovers < 1 || st.Current != recs[other].addr() {
		t.Errorf("uplink stats after the failure: failovers %d, current %q, want >= 1 and %s", st.Failovers, st.Current, recs[other].addr())
	}
	if img.up.Load() != up {
		t.Error("the uplink was replaced instead of failing over")
	}
	if n := proxy.logs.count("uplink request failed"); n != 0 {
		t.Errorf("%d uplink fetches failed; the failover should have hidden the failure", n)
	}
	waitFor(t, 10*time.Second, "RPC uplinkServer to show "+recs[other].addr(), func() bool {
		return rpcUplinkServer(t, proxy.addr, "img", 1) == recs[other].addr()
	})
	// the stream goes on through the other server
	const off = 6 << 20
	if rep, p := getBlock(t, c, off, 65536, 0, 200); rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, data[off:off+65536]) {
		t.Fatalf("read after the failover: %v", rep)
	}
	if !sawBlock(recs[other], off, 65536) {
		t.Error("read after the failover not relayed by the other server")
	}
}

// TestUplinkRTTSwitch: the uplink starts on the only reachable server,
// which answers server peers only after serverPenalty (its probe RTT is
// large). Once a second, fast server comes up, the client library's RTT
// probes make the uplink switch to it; the RPC shows the fast server.
func TestUplinkRTTSwitch(t *testing.T) {
	const size = 4 << 20
	slowBase, fastBase := t.TempDir(), t.TempDir()
	data := genImage(t, slowBase, "img.r1", size, false)
	genImage(t, fastBase, "img.r1", size, false)
	// serverPenalty delays every request after the handshake of a server
	// peer, so each RTT probe (connect, SELECT_IMAGE, GET_BLOCK) takes
	// at least 200 ms there; the switch needs 3/4 of it to exceed the fast
	// server's RTT + 1.8 ms.
	slow := runServer(t, slowBase, "serverPenalty=200000\n", nil, nil)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fastAddr := l.Addr().String()
	l.Close() // nothing listens until the fast server starts below
	proxy := startProxy(t, "", "", "", nil, slow.addr, fastAddr)
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1) // clones the image: the uplink is on the slow server
	img := loaded(t, proxy.Server, "img", 1)
	up := img.up.Load()
	if up == nil || up.ci == nil {
		t.Fatal("no uplink after the clone")
	}
	if got := rpcUplinkServer(t, proxy.addr, "img", 1); got != slow.addr {
		t.Fatalf("uplink starts on %q, want the slow server %s", got, slow.addr)
	}
	runServerAt(t, fastAddr, fastBase, "", nil, nil)
	waitFor(t, 12*time.Second, "the uplink to switch to the fast server", func() bool {
		return rpcUplinkServer(t, proxy.addr, "img", 1) == fastAddr
	})
	st := up.ci.Stats()
	if st.Switches < 1 || st.Current != fastAddr {
		t.Errorf("uplink stats: %d switches, current %q", st.Switches, st.Current)
	}
	var slowRTT, fastRTT time.Duration
	for _, s := range st.Servers {
		switch s.Addr {
		case slow.addr:
			slowRTT = s.RTT
		case fastAddr:
			fastRTT = s.RTT
		}
	}
	if slowRTT < 200*time.Millisecond || fastRTT <= 0 || fastRTT >= slowRTT {
		t.Errorf("probe RTTs: slow %v, fast %v", slowRTT, fastRTT)
	}
	if proxy.logs.count("dnbd3: switching to faster server") < 1 {
		t.Error("switch not logged")
	}
	if img.up.Load() != up {
		t.Error("the uplink was replaced instead of switching servers")
	}
	const off = 2 << 20
	if rep, p := getBlock(t, c, off, 65536, 0, 1); rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, data[off:off+65536]) {
		t.Fatalf("read after the switch: %v", rep)
	}
}

// TestIgnoreAllocErrors: when the local copy cannot be preallocated, a
// proxy with ignoreAllocErrors=false gives up the clone (the client's
// SELECT_IMAGE is refused, nothing is left on disk); with
// ignoreAllocErrors=true it continues with a sparse file and serves the
// image; with sparseFiles=true it never preallocates.
//
// Preallocation fails for real: the proxy's base path is on a size-limited
// tmpfs (/dev/shm), and the image is larger than the whole file system,
// which tmpfs refuses at once with ENOSPC (without allocating anything).
// The proxy's free-space check is told there is room (test hook), as
// statfs would not let the clone get that far.
func TestIgnoreAllocErrors(t *testing.T) {
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != unix.TMPFS_MAGIC || fs.Blocks == 0 {
		t.Skipf("SKIP: needs a size-limited tmpfs on /dev/shm (statfs: %v, type %#x, blocks %d)", err, fs.Type, fs.Blocks)
	}
	size := (int64(fs.Blocks)*int64(fs.Bsize) + 1<<30) &^ (protocol.BlockSize - 1)
	if size > 4<<40 {
		t.Skipf("SKIP: /dev/shm is too large (%d bytes) for a sparse origin image", size-1<<30)
	}
	// the origin's image: sparse, with generator data at two places
	obase := t.TempDir()
	path := filepath.Join(obase, "big.r1")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	mid := size / 2 &^ (protocol.BlockSize - 1)
	for _, off := range []int64{0, mid} {
		if _, err := f.WriteAt(testutil.GenImage(off, 65536), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Skipf("SKIP: cannot create a sparse %d-byte file: %v", size, err)
	}
	f.Close()
	origin := runServer(t, obase, "", nil, nil)

	const warning = "cannot preallocate local copy, continuing with a sparse file (ignoreAllocErrors)"
	for _, tc := range []struct {
		name, conf string
		cloned     bool
		warnings   int // fallbacks to a sparse file logged
	}{
		{"ignoreAllocErrors=false", "ignoreAllocErrors=false\n", false, 0},
		{"ignoreAllocErrors=true", "ignoreAllocErrors=true\n", true, 1},
		{"sparseFiles=true", "sparseFiles=true\n", true, 0}, // never preallocates
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, err := os.MkdirTemp("/dev/shm", "dnbd3-alloc-test-")
			if err != nil {
				t.Skipf("SKIP: cannot create a directory on /dev/shm: %v", err)
			}
			t.Cleanup(func() { os.RemoveAll(base) }) // after the proxy stopped
			limits := "maxPrefetch=0\nmaxReplicationSize=" + strconv.FormatInt(size, 10) + "\n"
			proxy := startProxy(t, base, tc.conf, limits, func(s *Server) {
				s.hooks.freeSpace = func() (int64, error) { return 1 << 50, nil }
			}, origin.addr)
			c := dial(t, proxy.addr)
			sel, ok := selectFlags(t, c, "big", 1, 0)
			if warned := proxy.logs.count(warning); warned != tc.warnings {
				t.Errorf("%q logged %d times, want %d", warning, warned, tc.warnings)
			}
			if !tc.cloned {
				if ok {
					t.Fatalf("SELECT_IMAGE answered (%+v) although the local copy could not be allocated", sel)
				}
				// the lookup failed because of the preallocation
				proxy.proxy.lkMu.Lock()
				lk, cached := proxy.proxy.lkCache[imageKey{"big", 1}]
				proxy.proxy.lkMu.Unlock()
				if !cached || !errors.Is(lk.err, unix.ENOSPC) || !strings.Contains(lk.err.Error(), "preallocate") {
					t.Errorf("lookup result %v (cached %v), want the preallocation's ENOSPC", lk.err, cached)
				}
				if proxy.store.loaded("big", 1) != nil {
					t.Error("image loaded after the failed clone")
				}
				entries, _ := os.ReadDir(base)
				for _, e := range entries {
					t.Errorf("left behind after the failed clone: %s", e.Name())
				}
				return
			}
			if !ok || sel.Size != uint64(size) || sel.Name != "big" || sel.RID != 1 {
				t.Fatalf("SELECT_IMAGE: %+v ok=%v, want big rid 1 of %d bytes", sel, ok, size)
			}
			for i, off := range []int64{0, mid} {
				if rep, p := getBlock(t, c, uint64(off), 65536, 0, uint64(i+1)); rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(p, testutil.GenImage(off, 65536)) {
					t.Fatalf("read at %d: %v", off, rep)
				}
			}
			st, err := os.Stat(filepath.Join(base, "big.r1"))
			if err != nil || st.Size() != size {
				t.Fatalf("local copy: %v %v", st, err)
			}
			if alloc := statBlocks(st) * 512; alloc > 16<<20 {
				t.Errorf("local copy has %d bytes allocated, want a sparse file", alloc)
			}
			if _, err := os.Stat(filepath.Join(base, "big.r1.map")); err != nil {
				t.Error(err)
			}
		})
	}
}
