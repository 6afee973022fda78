package server

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

const hashBlock = protocol.HashBlockSize

// reuseSize is the size of the images of the reuse tests: 4 full hash
// blocks and a short fifth one (12 KiB padded).
const reuseSize = 4*hashBlock + 10001

// revisions writes img.r1 and img.r2 (= r1 with hash blocks 1 and 3
// changed) with their .crc files to the origin's base path and returns
// both padded to the virtual size.
func revisions(t *testing.T, obase string, crc2 bool) (r1, r2 []byte) {
	t.Helper()
	r1 = genImage(t, obase, "img.r1", reuseSize, true)
	r2 = bytes.Clone(r1[:reuseSize])
	rng := rand.New(rand.NewPCG(1, 2))
	for _, off := range []int64{hashBlock + 5000, 3*hashBlock + 1<<20} {
		for i := range 100000 {
			r2[off+int64(i)] = byte(rng.Uint32())
		}
	}
	p := filepath.Join(obase, "img.r2")
	if err := os.WriteFile(p, r2, 0o644); err != nil {
		t.Fatal(err)
	}
	if crc2 {
		if _, err := WriteCRCFile(p); err != nil {
			t.Fatal(err)
		}
	}
	return r1, append(r2, make([]byte, protocol.VirtualSize(reuseSize)-reuseSize)...)
}

// reuseOrigin starts an origin serving img.r1 and img.r2 (see
// revisions) behind a recorder and returns the origin's and an empty
// proxy base path, both revisions padded and the recorder.
func reuseOrigin(t *testing.T, crc2 bool) (obase, pbase string, r1, r2 []byte, rec *recorder) {
	t.Helper()
	obase, pbase = t.TempDir(), t.TempDir()
	r1, r2 = revisions(t, obase, crc2)
	origin := runServer(t, obase, "", nil, nil)
	return obase, pbase, r1, r2, startRecorder(t, origin.addr)
}

// startReuseProxy starts a proxy of pbase with background replication
// whose uplink is the recorder.
func startReuseProxy(t *testing.T, pbase string, rec *recorder) *tsrv {
	t.Helper()
	return startProxy(t, pbase, "backgroundReplication=true\nbgrWindowSize=8\n", "", nil, rec.addr())
}

// replicaOf puts a complete replicated copy of data (with the origin's
// .crc and a .meta) into the proxy's base path as name.
func replicaOf(t *testing.T, obase, pbase, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(pbase, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(obase, name+".crc")); err == nil {
		os.WriteFile(filepath.Join(pbase, name+".crc"), b, 0o644)
	}
	writeMeta(filepath.Join(pbase, name), time.Now().Add(-time.Hour))
}

// waitRevision waits until the proxy's name:rid is complete and returns
// it.
func waitRevision(t *testing.T, s *Server, name string, rid uint16, d time.Duration) *image {
	t.Helper()
	var img *image
	waitFor(t, d, "revision to be complete", func() bool {
		img = s.store.loaded(name, rid)
		return img != nil && !img.incomplete()
	})
	return img
}

// rpcReuse returns the RPC's stats.bytesReused and the image's
// bytesReused (0 when absent).
func rpcReuse(t *testing.T, addr string, rid int) (stats, image uint64) {
	t.Helper()
	var q struct {
		BytesReused uint64 `json:"bytesReused"`
		Images      []struct {
			RID         int    `json:"rid"`
			BytesReused uint64 `json:"bytesReused"`
		} `json:"images"`
	}
	queryJSON(t, addr, "q=stats&q=images", &q)
	for _, img := range q.Images {
		if img.RID == rid {
			image = img.BytesReused
		}
	}
	return q.BytesReused, image
}

// replicateR2 has a client of the proxy read 4 KiB of r2 in hash block 1
// (changed, so fetched anyway) and waits until background replication
// completed the copy, which must equal want.
func replicateR2(t *testing.T, proxy *tsrv, want []byte) *image {
	t.Helper()
	ci := openClient(t, proxy.addr, "img", 2, 30*time.Second)
	expectRead(t, ci, want, hashBlock+4096, 4096)
	img := waitRevision(t, proxy.Server, "img", 2, 60*time.Second)
	if fileSHA(t, filepath.Join(proxy.base, "img.r2")) != sha256.Sum256(want) {
		t.Fatal("the proxy's copy of r2 differs from the origin's")
	}
	return img
}

// TestProxyReusesPreviousRevision: a proxy holding r1 complete replicates
// r2 by copying the hash blocks whose CRC did not change and fetching
// only the two that did; the copy is right, the RPC shows the bytes
// reused, and r1 stays as it was.
func TestProxyReusesPreviousRevision(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	replicaOf(t, obase, pbase, "img.r1", r1)
	proxy := startReuseProxy(t, pbase, rec)

	img := replicateR2(t, proxy, r2)
	fetched := rec.blockBytes()
	reused := int64(protocol.VirtualSize(reuseSize)) - 2*hashBlock
	t.Logf("fetched %d bytes, reused %d", fetched, img.bytesReused.Load())
	if fetched < 2*hashBlock || fetched > 2*hashBlock+64<<10 {
		t.Errorf("fetched %d bytes from the uplink, want the 2 changed hash blocks (%d, +64 KiB)", fetched, 2*hashBlock)
	}
	for _, r := range rec.blocks() {
		if hb := int64(r.Offset) / hashBlock; hb != 1 && hb != 3 {
			t.Errorf("fetched %d bytes at %d (hash block %d), which r1 has", r.Size, r.Offset, hb)
		}
	}
	if got := img.bytesReused.Load(); got != uint64(reused) {
		t.Errorf("image bytesReused %d, want %d", got, reused)
	}
	stats, image := rpcReuse(t, proxy.addr, 2)
	if stats != uint64(reused) || image != uint64(reused) {
		t.Errorf("RPC bytesReused: stats %d, image %d; want %d", stats, image, reused)
	}
	if line := proxy.StatusLine(); !strings.Contains(line, "reused") {
		t.Errorf("status line %q does not show the reuse", line)
	}
	if fileSHA(t, filepath.Join(pbase, "img.r1")) != sha256.Sum256(r1) {
		t.Error("r1 changed")
	}
	if _, err := os.Stat(filepath.Join(pbase, "img.r2.map")); !os.IsNotExist(err) {
		t.Errorf("img.r2.map after completion: %v", err)
	}
}

// TestProxyReusesPartialPrevious: the previous revision is only partly
// cached (its .map marks hash blocks 0 and 2); only those are copied,
// everything else is fetched.
func TestProxyReusesPartialPrevious(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	partial := bytes.Clone(r1)
	cm := newCacheMap(int64(len(r1)))
	for _, hb := range []int64{0, 2} {
		cm.setRange(hb*hashBlock, (hb+1)*hashBlock)
	}
	for off := int64(0); off < int64(len(partial)); off += protocol.BlockSize {
		if !cm.has(off, off+protocol.BlockSize) {
			clear(partial[off : off+protocol.BlockSize]) // absent: not on disk
		}
	}
	replicaOf(t, obase, pbase, "img.r1", partial)
	if err := cm.save(filepath.Join(pbase, "img.r1.map")); err != nil {
		t.Fatal(err)
	}
	proxy := startReuseProxy(t, pbase, rec)

	img := replicateR2(t, proxy, r2)
	if got := img.bytesReused.Load(); got != 2*hashBlock {
		t.Errorf("bytesReused %d, want hash blocks 0 and 2 (%d)", got, 2*hashBlock)
	}
	want := int64(len(r2)) - 2*hashBlock
	if fetched := rec.blockBytes(); fetched < want || fetched > want+64<<10 {
		t.Errorf("fetched %d bytes, want %d (+64 KiB)", fetched, want)
	}
}

// TestProxyReuseCorruptBlockFetched: a byte of the previous revision's
// copy is flipped in a hash block that did not change; the copy fails its
// CRC check against the new list, is not marked present and the block is
// fetched from the uplink; the result is right.
func TestProxyReuseCorruptBlockFetched(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	replicaOf(t, obase, pbase, "img.r1", r1)
	proxy := startReuseProxy(t, pbase, rec)
	// after the load-time checks, which might find it first
	waitChecksIdle(t, proxy.Server)
	testutil.FlipByte(t, filepath.Join(pbase, "img.r1"), 2*hashBlock+777)

	img := replicateR2(t, proxy, r2)
	if got := img.bytesReused.Load(); got != uint64(len(r2))-3*hashBlock {
		t.Errorf("bytesReused %d, want all but hash blocks 1, 2 and 3 (%d)", got, len(r2)-3*hashBlock)
	}
	fetched := rec.blockBytes()
	if fetched < 3*hashBlock || fetched > 3*hashBlock+64<<10 {
		t.Errorf("fetched %d bytes, want the changed and the corrupt hash block (%d)", fetched, 3*hashBlock)
	}
	if proxy.logs.count("hash block copied from the previous revision failed its check; fetching it from the uplink") != 1 {
		t.Error("the failed check of the copied block is not logged once")
	}
}

// TestProxyNoReuseWithoutLists: without the new revision's CRC list (the
// uplink has none) or without the old one's, nothing is copied and the
// whole image is fetched.
func TestProxyNoReuseWithoutLists(t *testing.T) {
	for _, missing := range []string{"new", "old"} {
		t.Run(missing, func(t *testing.T) {
			obase, pbase, r1, r2, rec := reuseOrigin(t, missing != "new")
			replicaOf(t, obase, pbase, "img.r1", r1)
			if missing == "old" {
				os.Remove(filepath.Join(pbase, "img.r1.crc"))
			}
			proxy := startReuseProxy(t, pbase, rec)
			img := replicateR2(t, proxy, r2)
			if got := img.bytesReused.Load(); got != 0 {
				t.Errorf("bytesReused %d without the %s list", got, missing)
			}
			if fetched := rec.blockBytes(); fetched < int64(len(r2)) {
				t.Errorf("fetched %d bytes, want the whole image (%d)", fetched, len(r2))
			}
			if stats, _ := rpcReuse(t, proxy.addr, 2); stats != 0 {
				t.Errorf("RPC stats.bytesReused %d", stats)
			}
			body := queryJSON(t, proxy.addr, "q=stats", nil)
			var keys map[string]any
			json.Unmarshal(body, &keys)
			if _, ok := keys["bytesReused"]; ok {
				t.Error("stats show bytesReused although nothing was reused (the reference's keys only)")
			}
		})
	}
}

// TestLRUKeepsReuseSource: while r2 is cloned and replicated from r1, r1
// is never the LRU victim, even as the least recently used replicated
// image; another one is deleted instead. Once r2 is complete and its
// uplink closed, r1 can be deleted.
func TestLRUKeepsReuseSource(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	replicaOf(t, obase, pbase, "img.r1", r1)
	genImage(t, pbase, "other.r1", 1<<20, false)
	writeMeta(filepath.Join(pbase, "other.r1"), time.Now().Add(-48*time.Hour))
	free, _ := duFree(pbase, 0)()
	capacity := -free + sparseDiskSpace - 1 // room for a sparse copy only after a deletion
	// Without replication r2 stays incomplete and its uplink open.
	proxy := startProxy(t, pbase, "backgroundReplication=false\nsparseFiles=true\nautoFreeDiskSpaceDelay=0\n", "", func(s *Server) {
		du := duFree(pbase, capacity)
		s.hooks.freeSpace = func() (int64, error) {
			if img := s.store.loaded("img", 1); img != nil {
				img.atime.Store(1) // r1 is the least recently used image
			}
			return du()
		}
	}, rec.addr())
	ci := openClient(t, proxy.addr, "img", 2, 60*time.Second)
	if _, err := os.Stat(filepath.Join(pbase, "other.r1")); !os.IsNotExist(err) {
		t.Errorf("other.r1 was not deleted to make room for r2: %v", err)
	}
	if _, err := os.Stat(filepath.Join(pbase, "img.r1")); err != nil {
		t.Fatalf("img.r1, the reuse source, was deleted while r2 was cloned: %v", err)
	}
	r1img := loaded(t, proxy.Server, "img", 1)
	waitFor(t, 20*time.Second, "the reuse walk", func() bool {
		return loaded(t, proxy.Server, "img", 2).bytesReused.Load() > 0
	})
	if r1img.reusePins.Load() == 0 {
		t.Fatal("r1 is not pinned while r2's uplink runs")
	}
	if v := proxy.proxy.lruVictim(true); v != nil {
		t.Fatalf("LRU victim %v while r2 is replicated from r1 (the only other replica)", v)
	}
	expectRead(t, ci, r2, 0, int64(len(r2))) // fetches the rest: r2 complete
	waitRevision(t, proxy.Server, "img", 2, 60*time.Second)
	ci.Close()
	waitFor(t, 20*time.Second, "r2's uplink to close and r1's pin to go", func() bool {
		return r1img.reusePins.Load() == 0
	})
	if v := proxy.proxy.lruVictim(true); v != r1img {
		t.Errorf("after r2 completed, the LRU victim is %v, want r1", v)
	}
}

// TestProxyReuseCopyFails: the previous revision's file is cut short
// after it was loaded, so copying hash blocks 2 and 4 from it fails
// (copy_file_range meets its end); those blocks are not marked present
// but fetched from the uplink, hash block 0 is still reused, and the
// result is right.
func TestProxyReuseCopyFails(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	replicaOf(t, obase, pbase, "img.r1", r1)
	proxy := startReuseProxy(t, pbase, rec)
	waitChecksIdle(t, proxy.Server)
	if err := os.Truncate(filepath.Join(pbase, "img.r1"), 2*hashBlock+4096); err != nil {
		t.Fatal(err)
	}

	img := replicateR2(t, proxy, r2)
	if got := img.bytesReused.Load(); got != hashBlock {
		t.Errorf("bytesReused %d, want hash block 0 only (%d)", got, hashBlock)
	}
	want := int64(len(r2)) - hashBlock
	if fetched := rec.blockBytes(); fetched < want || fetched > want+64<<10 {
		t.Errorf("fetched %d bytes, want all but hash block 0 (%d, +64 KiB)", fetched, want)
	}
	if n := proxy.logs.count("hash block copied from the previous revision failed its check; fetching it from the uplink"); n != 2 {
		t.Errorf("the failed copies are logged %d times, want 2", n)
	}
}

// TestProxyReuseAfterCrash: the proxy died while reusing r1 for r2: hash
// block 0 was copied completely but the .map saved before only marks
// its first MiB (died between the copy and the map save), hash block 2
// was copied half (died during the copy). After the restart the map
// decides: the unmarked parts of hash blocks 0, 2 and 4 are copied again
// and checked, hash blocks 1 and 3 are fetched, and the result is right.
func TestProxyReuseAfterCrash(t *testing.T) {
	obase, pbase, r1, r2, rec := reuseOrigin(t, true)
	replicaOf(t, obase, pbase, "img.r1", r1)
	onDisk := make([]byte, len(r2))
	copy(onDisk[:hashBlock], r2)
	copy(onDisk[2*hashBlock:2*hashBlock+hashBlock/2], r2[2*hashBlock:])
	replicaOf(t, obase, pbase, "img.r2", onDisk)
	cm := newCacheMap(int64(len(r2)))
	cm.setRange(0, 1<<20)
	if err := cm.save(filepath.Join(pbase, "img.r2.map")); err != nil {
		t.Fatal(err)
	}
	proxy := startReuseProxy(t, pbase, rec)

	img := replicateR2(t, proxy, r2)
	if got, want := img.bytesReused.Load(), uint64(len(r2))-2*hashBlock-1<<20; got != want {
		t.Errorf("bytesReused %d, want all but hash blocks 1 and 3 and the marked MiB (%d)", got, want)
	}
	if fetched := rec.blockBytes(); fetched < 2*hashBlock || fetched > 2*hashBlock+64<<10 {
		t.Errorf("fetched %d bytes, want the 2 changed hash blocks (%d, +64 KiB)", fetched, 2*hashBlock)
	}
	for _, r := range rec.blocks() {
		if hb := int64(r.Offset) / hashBlock; hb != 1 && hb != 3 {
			t.Errorf("fetched %d bytes at %d (hash block %d), which r1 has", r.Size, r.Offset, hb)
		}
	}
}
