package cowstore

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestLoadReferenceSession loads the session the reference client wrote
// and checks it shows the expected image.
func TestLoadReferenceSession(t *testing.T) {
	dir := fixtureDir(t, "meta")
	want, err := os.ReadFile(testutil.Testdata(t, "cow-session-v3", "expected.img.sha256"))
	if err != nil {
		t.Fatal(err)
	}
	// without a revision record, the revision must be given
	if _, err := Load(dir, Options{Remote: cowsrc(), ImageName: "cowsrc"}); err == nil || !strings.Contains(err.Error(), "-r") {
		t.Fatalf("load without rid: %v", err)
	}
	o, err := Load(dir, Options{Remote: cowsrc(), ImageName: "cowsrc", RID: 1, CommitInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if o.Size() != 9_000_000 || o.ValidRemoteSize() != 8_388_608 || o.UUID() != "c0ffee00-5e71-4d3b-9a0c-000000000001" || o.ImageName() != "cowsrc" {
		t.Fatalf("size %d valid %d uuid %q name %q", o.Size(), o.ValidRemoteSize(), o.UUID(), o.ImageName())
	}
	sum := sha256.Sum256(readAll(t, o))
	if got := hex.EncodeToString(sum[:]); !strings.HasPrefix(string(want), got) {
		t.Fatalf("image sha256 %s, expected %s", got, want)
	}
	if dirty, clean := o.Counts(); dirty != 0 || clean != 3 {
		t.Errorf("dirty %d clean %d, want 0 and 3 (all uploaded)", dirty, clean)
	}
	// the upload bodies we would send equal the reference's
	for _, c := range []int{0, 1, 6} {
		bits, blocks, _, err := o.Snapshot(c)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := os.ReadFile(testutil.Testdata(t, "cow-session-v3", "merger-uploads", "cluster-"+string(rune('0'+c))+".bin"))
		if err != nil {
			t.Fatal(err)
		}
		if body := append(bits[:], blocks...); !bytes.Equal(body, ref) {
			t.Errorf("cluster %d: upload body differs from the reference's (%d vs %d bytes)", c, len(body), len(ref))
		}
	}
	// reloading records the revision
	if rid, err := readRevision(dir); err != nil || rid != 1 {
		t.Errorf("revision record: %d %v", rid, err)
	}
}

// TestPreUnmountSessionIsDirty loads the meta copied while mounted: the
// three clusters are still waiting for upload.
func TestPreUnmountSessionIsDirty(t *testing.T) {
	dir := fixtureDir(t, "meta-before-unmount.gz")
	o, err := Load(dir, Options{Remote: cowsrc(), ImageName: "cowsrc", RID: 1, CommitInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	var got []int
	o.DirtyClusters(func(c int, changed int64) {
		if changed != 1795248541 {
			t.Errorf("cluster %d changed at %d", c, changed)
		}
		got = append(got, c)
	})
	if len(got) != 3 || got[0] != 0 || got[1] != 1 || got[2] != 6 {
		t.Fatalf("dirty clusters %v, want [0 1 6]", got)
	}
}

// TestSessionMatchesReferenceBytes repeats the fixture's write sequence on
// a new session: meta and data come out byte for byte as the reference
// client wrote them, so the reference client loads our sessions.
func TestSessionMatchesReferenceBytes(t *testing.T) {
	dir := t.TempDir()
	o, err := Create(dir, Options{Remote: cowsrc(), ImageName: "cowsrc", RID: 1, CommitInterval: -1, Now: fixedClock(1795248536)})
	if err != nil {
		t.Fatal(err)
	}
	o.opts.Now = fixedClock(1795248541)
	if err := o.SetUUID("c0ffee00-5e71-4d3b-9a0c-000000000001"); err != nil {
		t.Fatal(err)
	}
	fill := func(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }
	for _, w := range []struct {
		off  int64
		data []byte
	}{{0, fill(0xA1, 4096)}, {5000, fill(0xB2, 1)}, {1310000, fill(0xC3, 10000)}} {
		if _, err := o.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := o.Resize(9_000_000); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt(fill(0xD4, 100), 8_500_000); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	gotMeta, _ := os.ReadFile(filepath.Join(dir, "meta"))
	wantMeta := gunzip(t, testutil.Testdata(t, "cow-session-v3", "meta-before-unmount.gz"))
	if !bytes.Equal(gotMeta, wantMeta) {
		for i := range gotMeta {
			if gotMeta[i] != wantMeta[i] {
				t.Fatalf("meta differs from the reference's first at byte %d: %#x vs %#x", i, gotMeta[i], wantMeta[i])
			}
		}
		t.Fatalf("meta length %d vs %d", len(gotMeta), len(wantMeta))
	}
	gotData, _ := os.ReadFile(filepath.Join(dir, "data"))
	wantData, _ := os.ReadFile(testutil.Testdata(t, "cow-session-v3", "data"))
	if !bytes.Equal(gotData, wantData) {
		t.Fatalf("data differs from the reference's (%d vs %d bytes)", len(gotData), len(wantData))
	}
}
