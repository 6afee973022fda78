package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// syncFaults injects EIO into the proxy's fdatasync of local copies and
// its `.map` writes.
type syncFaults struct {
	data, mapWrite atomic.Bool
	dataCalls      atomic.Int32
}

func (f *syncFaults) install(s *Server) {
	s.hooks.syncData = func(w *os.File) error {
		f.dataCalls.Add(1)
		if f.data.Load() {
			return fmt.Errorf("fdatasync %s: %w", w.Name(), syscall.EIO)
		}
		return w.Sync()
	}
	s.hooks.writeMap = func(path string, b []byte) error {
		if f.mapWrite.Load() {
			return fmt.Errorf("write %s: %w", path, syscall.EIO)
		}
		return atomicMapWriter(path)(b)
	}
}

// proxyRead reads [off, off+n) of image name through the proxy at addr
// and compares it with want. Handshakes are repeated like a client would:
// a proxy with a write problem refuses 3 of 4 at random.
func proxyRead(t *testing.T, addr, name string, off int64, n int, want []byte) {
	t.Helper()
	var c net.Conn
	for range 200 {
		if c = trySelect(t, addr, name, 1); c != nil {
			break
		}
	}
	if c == nil {
		t.Fatalf("%s refused 200 times", name)
	}
	defer c.Close()
	rep, data := getBlock(t, c, uint64(off), uint32(n), 0, 1)
	if rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(data, want[off:off+int64(n)]) {
		t.Fatalf("read %d+%d: reply %v, data ok %v", off, n, rep, bytes.Equal(data, want[off:off+int64(n)]))
	}
}

// TestProxySyncFailureIsPermanent: after an fdatasync of a local copy (or
// the write of its `.map`) fails with EIO, the proxy never claims the
// blocks written since the last successful save as present, writes and
// saves nothing more even once the disk "recovers" (a retried fsync would
// report success for data the kernel dropped), reports ProblemWrite and
// logs at ERROR; clients are still served correct data, and after a
// restart the blocks that were dropped are fetched again.
func TestProxySyncFailureIsPermanent(t *testing.T) {
	for _, what := range []string{"data", "map"} {
		t.Run(what, func(t *testing.T) {
			const size = 1 << 20
			const blk = 64 << 10
			originBase := t.TempDir()
			want := genImage(t, originBase, "img.r1", size, false)
			origin := runServer(t, originBase, "", nil, nil)
			base := t.TempDir()
			var faults syncFaults
			proxy := startProxy(t, base, "", "", faults.install, origin.addr)

			proxyRead(t, proxy.addr, "img", 0, blk, want) // A
			img := loaded(t, proxy.Server, "img", 1)
			cm := img.cache.Load()
			if err := proxy.proxy.saveMap(img, cm); err != nil {
				t.Fatalf("first save: %v", err)
			}
			proxyRead(t, proxy.addr, "img", 4*blk, blk, want) // B, not saved yet
			if !cm.has(4*blk, 5*blk) {
				t.Fatal("B not cached")
			}

			if what == "data" {
				faults.data.Store(true)
			} else {
				faults.mapWrite.Store(true)
			}
			if err := proxy.proxy.saveMap(img, cm); err == nil {
				t.Fatal("save with EIO succeeded")
			}
			faults.data.Store(false) // the disk "recovers": a retry would succeed
			faults.mapWrite.Store(false)

			if cm.has(4*blk, 5*blk) {
				t.Error("B still claimed as cached after the failed sync")
			}
			if !cm.has(0, blk) {
				t.Error("A, saved before the failure, no longer cached")
			}
			if img.Problems()&problemWrite == 0 {
				t.Errorf("problems %d without ProblemWrite", img.Problems())
			}
			var rpc struct{ Problems uint32 }
			if err := json.Unmarshal(imageJSON(img), &rpc); err != nil || rpc.Problems&problemWrite == 0 {
				t.Errorf("RPC: %s (%v)", imageJSON(img), err)
			}
			if n := proxy.logs.count("sync of the local copy or its cache map failed: blocks not in the last saved map are fetched again, " +
				"and the copy is not written until the server restarts (check the disk)"); n != 1 {
				t.Errorf("ERROR logged %d times", n)
			}

			// still served, from the uplink; nothing new claimed or saved
			proxyRead(t, proxy.addr, "img", 4*blk, blk, want)
			proxyRead(t, proxy.addr, "img", 8*blk, blk, want) // C
			proxyRead(t, proxy.addr, "img", blk/2, blk, want) // half in A, half not cached
			if cm.has(4*blk, 5*blk) || cm.has(8*blk, 9*blk) {
				t.Error("blocks fetched after the failure claimed as cached")
			}
			calls := faults.dataCalls.Load()
			if err := proxy.proxy.saveMap(img, cm); err == nil {
				t.Error("a later save succeeded after a failed sync")
			}
			if faults.dataCalls.Load() != calls {
				t.Error("fdatasync retried after a failure")
			}
			onDisk := readFile(t, filepath.Join(base, "img.r1.map"))
			if onDisk[0] != 0xFF || onDisk[4*blk/(8*protocol.BlockSize)] != 0 {
				t.Errorf(".map on disk %x", onDisk[:16])
			}
			if img.evictable() {
				t.Error("an image with a failed sync may be unloaded (its problem would vanish)")
			}

			// restart: the saved map counts, B and C are fetched again
			proxy.stop()
			recv := proxy.bytesRecv.Load()
			proxy2 := startProxy(t, base, "", "", nil, origin.addr)
			img2 := loaded(t, proxy2.Server, "img", 1)
			if img2.Problems()&problemWrite != 0 {
				t.Errorf("problems %d after restart", img2.Problems())
			}
			cm2 := img2.cache.Load()
			if cm2 == nil || !cm2.has(0, blk) || cm2.has(4*blk, 5*blk) {
				t.Fatal("restart did not load the last saved map")
			}
			proxyRead(t, proxy2.addr, "img", 4*blk, blk, want)
			if !cm2.has(4*blk, 5*blk) || proxy2.bytesRecv.Load() == 0 {
				t.Errorf("B not fetched again after restart (received %d, before %d)", proxy2.bytesRecv.Load(), recv)
			}
		})
	}
}

// TestProxySyncFailureAtCompletion: a failed fdatasync of a copy that
// just became complete keeps its `.map` and marks it incomplete again
// instead of serving it as complete.
func TestProxySyncFailureAtCompletion(t *testing.T) {
	const size = 64 << 10
	originBase := t.TempDir()
	want := genImage(t, originBase, "small.r1", size, false)
	origin := runServer(t, originBase, "", nil, nil)
	base := t.TempDir()
	var faults syncFaults
	faults.data.Store(true)
	proxy := startProxy(t, base, "", "", faults.install, origin.addr)
	proxyRead(t, proxy.addr, "small", 0, size, want)
	img := loaded(t, proxy.Server, "small", 1)
	waitFor(t, 10*time.Second, "ProblemWrite after the completion's fdatasync failed", func() bool {
		return faults.dataCalls.Load() > 0 && img.Problems()&problemWrite != 0
	})
	faults.data.Store(false)
	if _, err := os.Stat(filepath.Join(base, "small.r1.map")); err != nil {
		t.Errorf(".map of a copy whose sync failed: %v", err)
	}
	if !img.incomplete() || img.complete() == 100 {
		t.Error("copy served as complete after its sync failed")
	}
	if img.Problems()&problemWrite == 0 {
		t.Errorf("problems %d", img.Problems())
	}
	proxyRead(t, proxy.addr, "small", 0, size, want) // relayed again
}
