package server

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// waitComplete waits until the proxy's copy of name:1 is complete.
func waitComplete(t *testing.T, s *Server, name string, d time.Duration) *image {
	t.Helper()
	var img *image
	waitFor(t, d, name+" to be complete", func() bool {
		img = s.store.loaded(name, 1)
		return img != nil && !img.incomplete()
	})
	return img
}

func TestBGRFullCompletesImage(t *testing.T) {
	const size = 64<<20 - 1000
	ps := newProxySetup(t, "img", size, "backgroundReplication=true\nbgrWindowSize=8\n", "")
	c := dial(t, ps.proxy.addr)
	start := time.Now()
	handshake(t, c, "img", 1)
	c.Close() // bgrMinClients=0: replication goes on without clients
	img := waitComplete(t, ps.proxy.Server, "img", 30*time.Second)
	t.Logf("replicated %d MiB in %v", size>>20, time.Since(start).Round(time.Millisecond))
	path := filepath.Join(ps.proxy.base, "img.r1")
	if _, err := os.Stat(path + ".map"); !os.IsNotExist(err) {
		t.Errorf(".map still there: %v", err)
	}
	if fileSHA(t, path) != sha256.Sum256(ps.data) {
		t.Fatal("local copy differs from the origin")
	}
	// The completion is logged after the last block is marked (and the
	// image reports complete): wait for it, then check it came once.
	waitFor(t, 10*time.Second, "the completion log line", func() bool { return ps.proxy.logs.count("Replication of img complete") >= 1 })
	if n := ps.proxy.logs.count("Replication of img complete"); n != 1 {
		t.Errorf("completion logged %d times", n)
	}
	var total int64
	for _, r := range ps.rec.blocks() {
		if r.Hops != protocol.HopFlagBgRep|1 || r.Size != bgrChunk && r.Offset+uint64(r.Size) != uint64(len(ps.data)) {
			t.Fatalf("unexpected upstream request %v", r)
		}
		total += int64(r.Size)
	}
	if total != int64(len(ps.data)) {
		t.Errorf("%d bytes fetched for a %d-byte image", total, len(ps.data))
	}
	// the uplink closes once nothing needs it; RPC shows a complete image
	waitFor(t, 5*time.Second, "uplink to close", func() bool { return img.up.Load() == nil })
	body := queryJSON(t, ps.proxy.addr, "q=images", nil)
	if !bytes.Contains(body, []byte(`"complete": 100,`)) || bytes.Contains(body, []byte("uplinkServer")) {
		t.Errorf("images: %s", body)
	}
	// every completed hash block was checked: no failure
	if n := ps.proxy.logs.count("Hash check for block 0 of img failed"); n != 0 {
		t.Error("hash check failed")
	}
	// the uplink's handshake announced a BGR server
	if sel := ps.rec.connRequests(1)[0]; sel[len(sel)-1] != protocol.FlagServer|protocol.FlagBgRep {
		t.Errorf("SELECT_IMAGE flags %#x", sel[len(sel)-1])
	}
}

func TestBGRHashblockCompletesTouchedBlocks(t *testing.T) {
	ps := newProxySetup(t, "img", 64<<20, "backgroundReplication=hashblock\nbgrWindowSize=4\n", "")
	c := dial(t, ps.proxy.addr)
	handshake(t, c, "img", 1)
	const off = 20 << 20 // hash block 1
	if _, p := getBlock(t, c, off, 4096, 0, 1); !bytes.Equal(p, ps.data[off:off+4096]) {
		t.Fatal("read")
	}
	img := loaded(t, ps.proxy.Server, "img", 1)
	cm := img.cache.Load()
	waitFor(t, 20*time.Second, "hash block 1", func() bool { return cm.hashBlockComplete(1) })
	time.Sleep(300 * time.Millisecond)
	for _, hb := range []int{0, 2, 3} {
		if cm.missing(int64(hb)<<24, int64(hb+1)<<24)[0] != [2]int64{int64(hb) << 24, int64(hb+1) << 24} {
			t.Errorf("hash block %d touched", hb)
		}
	}
	if !img.incomplete() {
		t.Fatal("image complete")
	}
	// the first 4 KiB relayed, then the 512 chunks of 32 KiB of hash block 1
	if n := ps.rec.blockBytes(); n != 16<<20+4096 {
		t.Errorf("fetched %d bytes, want 16 MiB + 4 KiB", n)
	}
}

func TestBGRMinClients(t *testing.T) {
	ps := newProxySetup(t, "img", 8<<20, "backgroundReplication=true\nbgrWindowSize=4\nbgrMinClients=2\n", "")
	c1 := dial(t, ps.proxy.addr)
	handshake(t, c1, "img", 1)
	getBlock(t, c1, 0, 4096, 0, 1)
	time.Sleep(700 * time.Millisecond)
	img := loaded(t, ps.proxy.Server, "img", 1)
	if got := img.cache.Load().Present(); got != 1 {
		t.Fatalf("%d blocks present with one client, want 1 (no replication below bgrMinClients)", got)
	}
	c2 := dial(t, ps.proxy.addr)
	handshake(t, c2, "img", 1)
	waitComplete(t, ps.proxy.Server, "img", 20*time.Second)
	if fileSHA(t, filepath.Join(ps.proxy.base, "img.r1")) != sha256.Sum256(ps.data) {
		t.Fatal("local copy differs")
	}
}

// TestProxyRestartResumes: a proxy that cached half an image is stopped
// (saving its map) and a new one on the same directory fetches only the
// other half, starting its uplink on the first access.
func TestProxyRestartResumes(t *testing.T) {
	const size = 16 << 20
	ps := newProxySetup(t, "img", size, "", "")
	ci := openClient(t, ps.proxy.addr, "img", 1, 10*time.Second)
	expectRead(t, ci, ps.data, 0, 8<<20)
	ci.Close()
	ps.proxy.stop()
	m, err := loadCacheMap(filepath.Join(ps.proxy.base, "img.r1.map"), size)
	if err != nil || m.Present() != 2048 || !m.has(0, 8<<20) {
		t.Fatalf("saved map: %v, %d blocks", err, m.Present())
	}
	before := ps.rec.blockBytes()

	p2 := startProxy(t, ps.proxy.base, "backgroundReplication=true\nbgrWindowSize=8\n", "", nil, ps.rec.addr())
	var q struct{ Images []map[string]any }
	queryJSON(t, p2.addr, "q=images", &q)
	if len(q.Images) != 1 || q.Images[0]["problems"] != float64(problemNoUplink) || q.Images[0]["complete"] != 50.0 || q.Images[0]["bytesReceived"] != nil {
		t.Fatalf("before the first access: %v", q.Images)
	}
	time.Sleep(300 * time.Millisecond)
	if ps.rec.blockBytes() != before {
		t.Fatal("uplink started before any access")
	}
	c := dial(t, p2.addr)
	handshake(t, c, "img", 1)
	waitComplete(t, p2.Server, "img", 20*time.Second)
	if got := ps.rec.blockBytes() - before; got != 8<<20 {
		t.Errorf("fetched %d bytes after the restart, want 8 MiB", got)
	}
	if fileSHA(t, filepath.Join(ps.proxy.base, "img.r1")) != sha256.Sum256(ps.data) {
		t.Fatal("local copy differs")
	}
}

// TestProxyShutdownSavesMapOfDataOnDisk: the map saved at shutdown covers
// what was fetched, and a map saved while fetches go on never claims more
// than the file holds.
func TestProxyPeriodicMapSave(t *testing.T) {
	ps := newProxySetup(t, "img", 4<<20, "", "")
	// shorten the save interval (the default is 10 s)
	ps.proxy.stop()
	p := startProxy(t, ps.proxy.base, "", "", func(s *Server) { s.hooks.mapSaveInterval = 200 * time.Millisecond }, ps.rec.addr())
	c := dial(t, p.addr)
	handshake(t, c, "img", 1)
	getBlock(t, c, 1<<20, 65536, 0, 1)
	path := filepath.Join(p.base, "img.r1")
	waitFor(t, 5*time.Second, "periodic map save", func() bool {
		m, err := loadCacheMap(path+".map", 4<<20)
		return err == nil && m.has(1<<20, 1<<20+65536)
	})
	if b, err := os.ReadFile(path + ".meta"); err != nil || !bytes.HasPrefix(b, []byte("[main]\natime=")) {
		t.Errorf(".meta: %q %v", b, err)
	}
}
