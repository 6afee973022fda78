package server

import (
	"bytes"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// duFree returns a freeSpace hook for a disk of capacity bytes holding
// the files below base.
func duFree(base string, capacity int64) func() (int64, error) {
	return func() (int64, error) {
		var used int64
		filepath.WalkDir(base, func(path string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				if st, err := d.Info(); err == nil {
					used += st.Size()
				}
			}
			return nil
		})
		return capacity - used, nil
	}
}

func TestProxyLRUDeletion(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "new.r1", 2<<20, false)
	origin := runServer(t, obase, "", nil, nil)

	setup := func(delay string) (base string, proxy *tsrv) {
		base = t.TempDir()
		genImage(t, base, "old.r1", 1<<20, true)
		writeMeta(filepath.Join(base, "old.r1"), time.Now().Add(-48*time.Hour)) // replicated, unused for 2 days
		genImage(t, base, "older.r1", 1<<20, false)
		writeMeta(filepath.Join(base, "older.r1"), time.Now().Add(-72*time.Hour))
		genImage(t, base, "keep.r1", 1<<20, false) // not replicated: never deleted
		os.Chtimes(filepath.Join(base, "keep.r1"), time.Now(), time.Now().Add(-100*time.Hour))
		genImage(t, base, "recent.r1", 1<<20, false)
		writeMeta(filepath.Join(base, "recent.r1"), time.Now().Add(-time.Hour)) // too recent
		free, _ := duFree(base, 0)()
		used := -free
		// room for the new 2 MiB image (+10 MiB reserve) only after
		// deleting one 1 MiB image
		capacity := used + 12<<20 - 1
		proxy = startProxy(t, base, "autoFreeDiskSpaceDelay="+delay+"\n", "", func(s *Server) {
			s.hooks.freeSpace = duFree(base, capacity)
		}, origin.addr)
		return base, proxy
	}

	base, proxy := setup("0")
	c := dial(t, proxy.addr)
	if _, ok := selectFlags(t, c, "new", 1, 0); !ok {
		t.Fatal("new image not cloned")
	}
	for _, name := range []string{"older.r1", "older.r1.meta"} {
		if _, err := os.Stat(filepath.Join(base, name)); !os.IsNotExist(err) {
			t.Errorf("%s not deleted", name)
		}
	}
	for _, name := range []string{"old.r1", "old.r1.crc", "keep.r1", "recent.r1", "new.r1", "new.r1.map"} {
		if _, err := os.Stat(filepath.Join(base, name)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if proxy.store.loaded("older", 1) != nil {
		t.Error("deleted image still loaded")
	}

	// no deletion: the clone is refused, nothing deleted
	for _, delay := range []string{"-1", "10h"} {
		base, proxy := setup(delay)
		c := dial(t, proxy.addr)
		if _, ok := selectFlags(t, c, "new", 1, 0); ok {
			t.Errorf("autoFreeDiskSpaceDelay=%s: cloned without space", delay)
		}
		for _, name := range []string{"old.r1", "older.r1", "keep.r1"} {
			if _, err := os.Stat(filepath.Join(base, name)); err != nil {
				t.Errorf("autoFreeDiskSpaceDelay=%s: %s: %v", delay, name, err)
			}
		}
		if _, err := os.Stat(filepath.Join(base, "new.r1.map")); !os.IsNotExist(err) {
			t.Errorf("leftover .map of a refused clone")
		}
	}
}

// TestProxyRejectsBadCRCList: a CRC list whose master CRC does not match
// is not stored; the image is still cloned and served.
func TestProxyRejectsBadCRCList(t *testing.T) {
	obase := t.TempDir()
	data := genImage(t, obase, "img.r1", 20<<20, true)
	origin := runServer(t, obase, "", nil, nil)
	rec := startRecorder(t, origin.addr)
	rec.mu.Lock()
	rec.tamper = true
	rec.mu.Unlock()
	proxy := startProxy(t, "", "", "", nil, rec.addr())
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	if _, p := getBlock(t, c, 0, 4096, 0, 1); !bytes.Equal(p, data[:4096]) {
		t.Fatal("read")
	}
	if _, err := os.Stat(filepath.Join(proxy.base, "img.r1.crc")); !os.IsNotExist(err) {
		t.Errorf(".crc stored despite a bad master CRC: %v", err)
	}
	if loaded(t, proxy.Server, "img", 1).crcList() != nil {
		t.Error("CRC list in use")
	}
}

// TestProxySparseAndPrealloc: the local copy has the padded size; with
// sparseFiles it is sparse, else preallocated.
func TestProxySparseAndPrealloc(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "img.r1", 8<<20+10001, false)
	origin := runServer(t, obase, "", nil, nil)
	for _, sparse := range []bool{false, true} {
		conf := ""
		if sparse {
			conf = "sparseFiles=true\n"
		}
		proxy := startProxy(t, "", conf, "", nil, origin.addr)
		c := dial(t, proxy.addr)
		handshake(t, c, "img", 1)
		st, err := os.Stat(filepath.Join(proxy.base, "img.r1"))
		if err != nil || st.Size() != 8<<20+12288 {
			t.Fatalf("size %v %v", st.Size(), err)
		}
		blocks := statBlocks(st) * 512
		if sparse && blocks > 1<<20 || !sparse && blocks < 8<<20 {
			t.Errorf("sparse=%v: %d bytes allocated", sparse, blocks)
		}
	}
}

// TestProxyLatestRevision: rid 0 on a proxy asks the uplinks for the latest
// revision and clones it when it is newer than the local ones.
func TestProxyLatestRevision(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "img.r1", 65536, false)
	data3 := genImage(t, obase, "img.r3", 131072, false)
	origin := runServer(t, obase, "", nil, nil)
	pbase := t.TempDir()
	genImage(t, pbase, "img.r2", 65536, false)
	genImage(t, pbase, "local.r5", 65536, false)
	proxy := startProxy(t, pbase, "", "", nil, origin.addr)
	c := dial(t, proxy.addr)
	if sel := handshake(t, c, "img", 0); sel.RID != 3 || sel.Size != 131072 {
		t.Fatalf("rid 0: %+v, want the upstream's rid 3", sel)
	}
	if _, p := getBlock(t, c, 65536, 4096, 0, 1); !bytes.Equal(p, data3[65536:65536+4096]) {
		t.Fatal("data of rid 3")
	}
	// an image only the proxy has: its local latest, the failed lookup is cached
	c2 := dial(t, proxy.addr)
	if sel := handshake(t, c2, "local", 0); sel.RID != 5 {
		t.Fatalf("local rid 0: %+v", sel)
	}
}

// TestAltServersRTTAndFailures: the uplink's RTT probes show up in the
// RPC's altservers history, connection failures in numFails.
func TestAltServersRTTAndFailures(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "img.r1", 65536, false)
	origin := runServer(t, obase, "", nil, nil)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	l.Close()
	proxy := startProxy(t, "", "", "", nil, dead, origin.addr)
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	var q struct {
		Altservers []struct {
			Host     string
			Rtt      []uint32
			NumFails int
		}
	}
	waitFor(t, 10*time.Second, "an RTT sample", func() bool {
		queryJSON(t, proxy.addr, "q=altservers", &q)
		return len(q.Altservers) == 2 && q.Altservers[1].Rtt[4] != 0
	})
	if q.Altservers[0].Host != dead || q.Altservers[0].NumFails < 1 || q.Altservers[1].NumFails != 0 {
		t.Errorf("altservers %+v", q.Altservers)
	}
}

func statBlocks(st os.FileInfo) int64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Blocks
	}
	return 0
}
