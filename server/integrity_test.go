package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestProxyRepairsBadHashBlock: a byte of a complete replicated copy is
// flipped; VerifyAll finds the hash block, clears it from the map and the
// proxy fetches it again (with background replication off), after which
// the copy is identical to the origin and complete again.
func TestProxyRepairsBadHashBlock(t *testing.T) {
	const size = 40<<20 + 10001
	obase := t.TempDir()
	data := genImage(t, obase, "img.r1", size, true)
	origin := runServer(t, obase, "", nil, nil)
	rec := startRecorder(t, origin.addr)
	// the proxy has a complete replicated copy (with .crc and .meta)
	pbase := t.TempDir()
	if err := os.WriteFile(filepath.Join(pbase, "img.r1"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ext := range []string{".crc"} {
		b, _ := os.ReadFile(filepath.Join(obase, "img.r1"+ext))
		os.WriteFile(filepath.Join(pbase, "img.r1"+ext), b, 0o644)
	}
	writeMeta(filepath.Join(pbase, "img.r1"), time.Now())

	proxy := startProxy(t, pbase, "", "", nil, rec.addr())
	waitChecksIdle(t, proxy.Server)
	testutil.FlipByte(t, filepath.Join(pbase, "img.r1"), 20<<20)
	imgs, failed := proxy.VerifyAll(context.Background())
	if imgs != 1 || failed < 1 {
		t.Fatalf("VerifyAll: %d images, %d failed", imgs, failed)
	}
	if proxy.logs.count("Hash check for block 1 of img failed") < 1 {
		t.Error("failure not logged as the reference does")
	}
	img := waitComplete(t, proxy.Server, "img", 20*time.Second)
	if fileSHA(t, filepath.Join(pbase, "img.r1")) != sha256.Sum256(data) {
		t.Fatal("copy not repaired")
	}
	if _, err := os.Stat(filepath.Join(pbase, "img.r1.map")); !os.IsNotExist(err) {
		t.Errorf(".map after repair: %v", err)
	}
	if n := rec.blockBytes(); n != 16<<20 {
		t.Errorf("fetched %d bytes, want the 16 MiB hash block", n)
	}
	for _, r := range rec.blocks() {
		if r.Hops != protocol.HopFlagBgRep|1 || r.Offset < 16<<20 || r.Offset >= 32<<20 {
			t.Fatalf("repair request %v", r)
		}
	}
	if _, failed := proxy.VerifyAll(context.Background()); failed != 0 {
		t.Fatalf("%d blocks still bad", failed)
	}
	// clients read good data
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	if _, p := getBlock(t, c, 20<<20, 4096, 0, 1); !bytes.Equal(p, data[20<<20:20<<20+4096]) {
		t.Fatal("read after repair")
	}
	_ = img
}

// TestBadHashBlockRefusedWithoutUplink: a server that cannot repair (not a
// proxy) answers reads of a hash block that failed its check with
// CMD_ERROR, keeps the connection, serves the other blocks, and serves the
// block again once a check finds it good. The check at load (first, last
// and one random complete block: all three of a 3-block image) finds it
// without SIGUSR1.
func TestBadHashBlockRefusedWithoutUplink(t *testing.T) {
	base := t.TempDir()
	data := genImage(t, base, "img.r1", 40<<20+10001, true)
	path := filepath.Join(base, "img.r1")
	testutil.FlipByte(t, path, 20<<20)
	ts := runServer(t, base, "", nil, nil)
	waitFor(t, 10*time.Second, "the check at load", func() bool {
		return ts.logs.count("Hash check for block 1 of img failed") > 0
	})
	c := dial(t, ts.addr)
	handshake(t, c, "img", 1)
	if rep, _ := getBlock(t, c, 20<<20-100, 200, 0, 1); rep.Cmd != protocol.CmdError || rep.Handle != 1 {
		t.Fatalf("read of the bad block: %v", rep)
	}
	if _, p := getBlock(t, c, 0, 4096, 0, 2); !bytes.Equal(p, data[:4096]) {
		t.Fatal("good block")
	}
	testutil.FlipByte(t, path, 20<<20) // flip it back
	if _, failed := ts.VerifyAll(context.Background()); failed != 0 {
		t.Fatalf("%d failed after the fix", failed)
	}
	if _, p := getBlock(t, c, 20<<20, 4096, 0, 3); !bytes.Equal(p, data[20<<20:20<<20+4096]) {
		t.Fatal("block not served after it checked good")
	}
}

// TestProxyChecksReplicatedHashBlocks: when a fetch completes a hash block
// it is checked; a wrong one (here: the uplink's data does not match the
// CRC list, so the upstream copy is bad) is fetched again a few times,
// then refused.
func TestProxyChecksReplicatedHashBlocks(t *testing.T) {
	obase := t.TempDir()
	genImage(t, obase, "img.r1", 2<<20, true)
	origin := runServer(t, obase, "", nil, nil)
	waitChecksIdle(t, origin.Server)
	testutil.FlipByte(t, filepath.Join(obase, "img.r1"), 1000) // origin's data no longer matches its .crc
	proxy := startProxy(t, "", "", "", nil, origin.addr)
	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1)
	getBlock(t, c, 0, 2<<20, 0, 1) // completes hash block 0 (the whole image)
	waitFor(t, 15*time.Second, "the repair attempts to give up", func() bool {
		img := proxy.store.loaded("img", 1)
		return img != nil && img.hasBad.Load()
	})
	if n := proxy.logs.count("Hash check for block 0 of img failed"); n < maxRepairs {
		t.Errorf("%d failed checks, want %d repair attempts first", n, maxRepairs)
	}
	c2 := dial(t, proxy.addr)
	handshake(t, c2, "img", 1)
	if rep, _ := getBlock(t, c2, 0, 4096, 0, 5); rep.Cmd != protocol.CmdError {
		t.Fatalf("read of a block that keeps failing: %v", rep)
	}
}

// waitChecksIdle waits until s has no background hash checks queued or
// running.
func waitChecksIdle(t *testing.T, s *Server) {
	t.Helper()
	waitFor(t, 10*time.Second, "background checks", func() bool {
		s.checker.mu.Lock()
		defer s.checker.mu.Unlock()
		return !s.checker.running && len(s.checker.q) == 0
	})
}
