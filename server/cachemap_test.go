package server

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestCacheMapMatchesProxyCapture rebuilds the captured proxy's map from
// the five ranges its client read and compares it with the `.map` and
// /cachemap bytes the reference wrote.
func TestCacheMapMatchesProxyCapture(t *testing.T) {
	const vsize = 41955328
	ref, err := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.map"))
	if err != nil {
		t.Fatal(err)
	}
	live, _ := os.ReadFile(testutil.Testdata(t, "rpc", "cachemap-proxy-id1.bin"))
	if !bytes.Equal(ref, live) {
		t.Fatal("fixtures disagree")
	}
	m := newCacheMap(vsize)
	for _, r := range [][2]int64{{0, 4096}, {100000, 150000}, {16775168, 16779264}, {33554432, 33685504}, {41953280, 41955328}} {
		// the proxy fetched the 4 KiB-aligned covering range
		for _, miss := range m.missing(r[0], r[1]) {
			m.setRange(miss[0], miss[1])
		}
	}
	if !bytes.Equal(m.bytes(), ref) {
		t.Fatalf("map differs from the reference's .map")
	}
	if m.Present() != 49 || m.percent() != 0 || m.complete() {
		t.Fatalf("present %d percent %d", m.Present(), m.percent())
	}
	// and loading the reference file gives the same
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x.map"), ref, 0o644)
	l, err := loadCacheMap(filepath.Join(dir, "x.map"), vsize)
	if err != nil || l.Present() != 49 || !l.has(33554432, 33685504) || l.has(4096, 8192) {
		t.Fatalf("load: %v present %d", err, l.Present())
	}
	if got := l.missing(0, 3*4096); len(got) != 1 || got[0] != [2]int64{4096, 12288} {
		t.Fatalf("missing %v", got)
	}
}

func TestCacheMapCompleteShortFileAndSave(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "img.r1.map")
	os.WriteFile(path, []byte{0xff}, 0o644)   // short: the rest is missing
	m, err := loadCacheMap(path, 10*4096+100) // 11 blocks
	if err != nil || m.Present() != 8 || m.Blocks() != 11 {
		t.Fatalf("%v %d %d", err, m.Present(), m.Blocks())
	}
	if completed, _ := m.setRange(8*4096, 11*4096); !completed || !m.complete() || m.percent() != 100 {
		t.Fatal("not complete")
	}
	if _, dirty := m.unsaved(); !dirty {
		t.Fatal("changes not tracked")
	}
	if err := m.save(path); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, []byte{0xff, 0x07}) {
		t.Fatalf("saved %x", b)
	}
	m.clear(4096, 4097)
	if m.complete() || m.has(4096, 8192) || !m.has(0, 4096) {
		t.Fatal("clear")
	}
	now := time.Unix(1795248691, 0)
	img := filepath.Join(dir, "img.r1")
	os.WriteFile(img, nil, 0o644)
	if err := writeMeta(img, now); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(img + ".meta"); string(b) != "[main]\natime=1795248691\n" {
		t.Fatalf("meta %q", b)
	}
	if got, err := readMeta(img); err != nil || !got.Equal(now) {
		t.Fatalf("ReadMeta %v %v", got, err)
	}
	ref, _ := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.meta"))
	if string(ref) != "[main]\natime=1795248691\n" {
		t.Fatalf("reference .meta format %q", ref)
	}
}

// TestCacheMapFail: after Fail the map keeps only the blocks both it and
// the saved copy have, sets no more and never saves again.
func TestCacheMapFail(t *testing.T) {
	m := newCacheMap(64 * protocol.BlockSize)
	m.setRange(0, 16*protocol.BlockSize)
	saved := m.bytes()
	m.setRange(16*protocol.BlockSize, 32*protocol.BlockSize) // not saved
	m.clear(0, protocol.BlockSize)                           // cleared after the save
	m.fail(errors.New("EIO"), saved)
	if m.has(0, protocol.BlockSize) || !m.has(protocol.BlockSize, 16*protocol.BlockSize) || m.has(16*protocol.BlockSize, 17*protocol.BlockSize) {
		t.Fatalf("bits after Fail: %x", m.bytes())
	}
	if m.Present() != 15 {
		t.Fatalf("present %d, want 15", m.Present())
	}
	if _, dirty := m.unsaved(); dirty {
		t.Error("unsaved changes after Fail")
	}
	if done, hbs := m.setRange(32*protocol.BlockSize, 64*protocol.BlockSize); done || hbs != nil || m.has(32*protocol.BlockSize, 33*protocol.BlockSize) {
		t.Error("SetRange after Fail set blocks")
	}
	wrote := false
	if err := m.saveSynced(func() error { return nil }, func([]byte) error { wrote = true; return nil }); err == nil || wrote {
		t.Errorf("save after Fail: %v, wrote %v", err, wrote)
	}
}
