package server

import (
	"bytes"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestUplinkCandidates: client-only entries are never uplinks, private
// ones only with proxyPrivateOnly, namespaces restrict, the server itself
// is skipped.
func TestUplinkCandidates(t *testing.T) {
	alts, warns := parseAltServers([]byte(`
[10.0.0.1]
comment=both
[10.0.0.2]
for=client
[10.0.0.3]
for=replication
[10.0.0.4]
namespace=linux/
[127.0.0.1:5003]
comment=this server
`), nil)
	if len(warns) > 0 {
		t.Fatal(warns)
	}
	s := &Server{alts: alts}
	s.cfg.Store(&Config{IsProxy: true})
	s.listen.store(netip.MustParseAddrPort("0.0.0.0:5003"))
	p := newProxy(s)
	hosts := func(list []*altServer) string {
		var out []string
		for _, a := range list {
			out = append(out, a.Addr.String())
		}
		return strings.Join(out, " ")
	}
	if got := hosts(p.candidates("windows/x")); got != "10.0.0.1:5003 10.0.0.3:5003" {
		t.Errorf("windows/x: %s", got)
	}
	if got := hosts(p.candidates("linux/x")); got != "10.0.0.1:5003 10.0.0.3:5003 10.0.0.4:5003" {
		t.Errorf("linux/x: %s", got)
	}
	s.cfg.Store(&Config{IsProxy: true, ProxyPrivateOnly: true})
	if got := hosts(p.candidates("linux/x")); got != "10.0.0.3:5003" {
		t.Errorf("private only: %s", got)
	}
	s.cfg.Store(&Config{IsProxy: true})
	// fewest failures first; 20 failures in a row block a server for a while
	for range 3 {
		alts[0].recordFailure()
	}
	if got := hosts(p.candidates("x")); got != "10.0.0.3:5003 10.0.0.1:5003" {
		t.Errorf("after failures: %s", got)
	}
	for range 20 {
		alts[2].recordFailure()
	}
	if got := hosts(p.candidates("x")); got != "10.0.0.1:5003" {
		t.Errorf("blocked: %s", got)
	}
}

// TestPretendClient: the uplink handshake does not claim to be a server
// and replication requests carry the prefetch flag.
func TestPretendClient(t *testing.T) {
	ps := newProxySetup(t, "img", 1<<20, "pretendClient=true\nbackgroundReplication=true\nbgrWindowSize=4\n", "")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	waitComplete(t, ps.proxy.Server, "img", 10*time.Second)
	if sel := ps.rec.connRequests(1)[0]; sel[len(sel)-1] != 0 {
		t.Errorf("SELECT_IMAGE flags %#x, want 0", sel[len(sel)-1])
	}
	for _, r := range ps.rec.blocks() {
		if r.Hops != protocol.HopFlagPrefetch|1 {
			t.Fatalf("replication request %v, want hops 0x41", r)
		}
	}
}

// TestUplinkIdleClose: an uplink without client traffic closes after the
// idle timeout (1800 s, shortened here); the next read starts a new one.
func TestUplinkIdleClose(t *testing.T) {
	obase := t.TempDir()
	data := genImage(t, obase, "img.r1", 1<<20, false)
	origin := runServer(t, obase, "", nil, nil)
	proxy := startProxy(t, "", "", "", func(s *Server) { s.hooks.uplinkIdle = 300 * time.Millisecond }, origin.addr)
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	getBlock(t, c, 0, 4096, 0, 1)
	img := loaded(t, proxy.Server, "img", 1)
	waitFor(t, 5*time.Second, "idle uplink to close", func() bool { return img.up.Load() == nil })
	body := queryJSON(t, proxy.addr, "q=images", nil)
	if !bytes.Contains(body, []byte(`"problems": 8}`)) {
		t.Errorf("images without uplink: %s", body)
	}
	if _, p := getBlock(t, c, 65536, 4096, 0, 2); !bytes.Equal(p, data[65536:65536+4096]) {
		t.Fatal("read after the uplink closed")
	}
}

// TestMaxReplicationSize: larger images are not cloned.
func TestMaxReplicationSize(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "big.r1", 2<<20, false)
	genImage(t, obase, "small.r1", 1<<20, false)
	origin := runServer(t, obase, "", nil, nil)
	proxy := startProxy(t, "", "", "maxReplicationSize=1048576\n", nil, origin.addr)
	if _, ok := selectFlags(t, dial(t, proxy.addr), "big", 1, 0); ok {
		t.Error("image above maxReplicationSize cloned")
	}
	if _, ok := selectFlags(t, dial(t, proxy.addr), "small", 1, 0); !ok {
		t.Error("image of maxReplicationSize not cloned")
	}
}

// TestNonProxyIncompleteImage: a server that is not a proxy serves the
// present blocks of an image with a .map, refuses the others with
// CMD_ERROR (connection kept), and follows the .map written by someone
// else; without the .map the image is complete.
func TestNonProxyIncompleteImage(t *testing.T) {
	base := t.TempDir()
	path, err := CreateImage(base, "inc", 1, 1<<20, true, false)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	f, _ := os.OpenFile(path, os.O_WRONLY, 0)
	f.WriteAt(data[:65536], 0)
	f.Close()
	os.WriteFile(path+".map", append([]byte{0xff, 0xff}, make([]byte, 30)...), 0o644)
	ts := runServer(t, base, "", nil, func(s *Server) { s.hooks.mapReload = 100 * time.Millisecond })
	c := dial(t, ts.addr)
	handshake(t, c, "inc", 1)
	if _, p := getBlock(t, c, 0, 65536, 0, 1); !bytes.Equal(p, data[:65536]) {
		t.Fatal("present blocks")
	}
	if rep, _ := getBlock(t, c, 65536, 4096, 0, 2); rep.Cmd != protocol.CmdError || rep.Handle != 2 {
		t.Fatalf("absent block: %v", rep)
	}
	// another server (sharing the directory) completes the image
	f, _ = os.OpenFile(path, os.O_WRONLY, 0)
	f.WriteAt(data, 0)
	f.Close()
	os.Remove(path + ".map")
	img := loaded(t, ts.Server, "inc", 1)
	waitFor(t, 5*time.Second, "the image to be complete", func() bool { return !img.incomplete() })
	if _, p := getBlock(t, c, 65536, 65536, 0, 3); !bytes.Equal(p, data[65536:131072]) {
		t.Fatal("after completion")
	}
}

// TestCacheMapRandomOps compares the cache map's range operations with a
// plain model under random operations.
func TestCacheMapRandomOps(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for round := range 50 {
		vsize := (1 + rng.Int64N(3*blocksPerHashBlock)) * protocol.BlockSize
		if round%5 == 0 {
			vsize = protocol.HashBlockSize * (1 + rng.Int64N(3))
		}
		m := newCacheMap(vsize)
		model := make([]bool, m.Blocks())
		for range 200 {
			s := rng.Int64N(vsize)
			e := min(s+1+rng.Int64N(4<<20), vsize)
			if rng.IntN(4) == 0 {
				m.clear(s, e)
				for b := s / 4096; b < (e+4095)/4096; b++ {
					model[b] = false
				}
			} else {
				s &^= 4095
				e = min((e+4095)&^4095, vsize)
				before := make([]bool, len(model))
				copy(before, model)
				completed, hbs := m.setRange(s, e)
				for b := s / 4096; b < e/4096; b++ {
					model[b] = true
				}
				all := true
				for _, x := range model {
					all = all && x
				}
				changed := false
				for b := range model {
					changed = changed || before[b] != model[b]
				}
				if completed != (all && changed) {
					t.Fatalf("completed %v, model complete %v changed %v", completed, all, changed)
				}
				for _, hb := range hbs {
					if !m.hashBlockComplete(hb) {
						t.Fatalf("reported hash block %d not complete", hb)
					}
				}
			}
			// NextChunk finds the first byte with an absent block
			from := rng.Int64N(int64(len(m.bytes())))
			idx, ok := m.nextChunk(from, false)
			want, wok := int64(-1), false
			n := int64(len(m.bytes()))
			for k := int64(0); k < n && !wok; k++ {
				i := (from + k) % n
				for b := i * 8; b < min(i*8+8, int64(len(model))); b++ {
					if !model[b] {
						want, wok = i, true
						break
					}
				}
			}
			if ok != wok || ok && idx != want {
				t.Fatalf("NextChunk(%d) = %d %v, want %d %v", from, idx, ok, want, wok)
			}
		}
		for b, x := range model {
			if m.has(int64(b)*4096, int64(b)*4096+4096) != x {
				t.Fatalf("block %d", b)
			}
		}
	}
}
