package server

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestReloadAdoptsNewCRCList: after `dnbd3-server --crc` wrote the .crc of
// a loaded image, a reload (SIGHUP) takes the list for the same image
// instead of replacing it as "changed on disk"; a different list or a
// different file still counts as a change.
func TestReloadAdoptsNewCRCList(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "a.r1"), testutil.GenImage(0, 20<<20))
	writeFile(t, filepath.Join(base, "b.r1"), testutil.GenImage(0, 20<<20))
	dir, cfg := writeConfigDir(t, base, "", nil)
	log, lc := captureLogger(t)
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.store.Close()
	a, b := srv.store.loaded("a", 1), srv.store.loaded("b", 1)
	list, err := WriteCRCFile(filepath.Join(base, "a.r1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(lc.String(), "image changed on disk") {
		t.Errorf("--crc then SIGHUP logged a change:\n%s", lc.String())
	}
	if got := srv.store.loaded("a", 1); got != a || !slices.Equal(got.crcList(), list) {
		t.Errorf("image a after the reload: same image %v, CRC list adopted %v", got == a, got != nil && slices.Equal(got.crcList(), list))
	}

	// A changed list of the same file is a change.
	bad := append([]uint32(nil), list...)
	bad[1]++
	writeFile(t, filepath.Join(base, "a.r1.crc"), protocol.MarshalCRCList(bad))
	// A new file of the same size with its own list is a change too.
	os.Rename(filepath.Join(base, "a.r1"), filepath.Join(base, "b.r1"))
	writeFile(t, filepath.Join(base, "a.r1"), testutil.GenImage(1, 20<<20))
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	if srv.store.loaded("a", 1) == a {
		t.Error("a changed CRC list was adopted")
	}
	if _, err := WriteCRCFile(filepath.Join(base, "b.r1")); err != nil {
		t.Fatal(err)
	}
	if err := srv.Reload(); err != nil {
		t.Fatal(err)
	}
	if srv.store.loaded("b", 1) == b {
		t.Error("the CRC list of a replaced file was adopted for the old one")
	}
	if n := strings.Count(lc.String(), "image changed on disk"); n != 2 {
		t.Errorf("%d changes logged, want 2:\n%s", n, lc.String())
	}
}
