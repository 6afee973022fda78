package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/dnbd3go/dnbd3go/protocol"
)

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// symlinkSet creates, below base, symlinks named with suffix: to a
// directory and a file outside base, to a directory and a file inside
// base, and a file link that leads outside through a directory link. It
// returns the image names that may be served and those that must not.
func symlinkSet(t *testing.T, base, outside, suffix string) (served, refused []string) {
	symlink(t, outside, filepath.Join(base, "linkdir"+suffix))
	symlink(t, filepath.Join(base, "real"), filepath.Join(base, "indir"+suffix))
	symlink(t, filepath.Join(base, "img.r1"), filepath.Join(base, "filein"+suffix+".r1"))
	symlink(t, "real/inner.r1", filepath.Join(base, "relin"+suffix+".r1"))
	symlink(t, filepath.Join(outside, "outfile.r1"), filepath.Join(base, "fileout"+suffix+".r1"))
	symlink(t, filepath.Join(base, "linkdir"+suffix, "secret.r1"), filepath.Join(base, "chain"+suffix+".r1"))
	symlink(t, "../"+filepath.Base(outside)+"/outfile.r1", filepath.Join(base, "relout"+suffix+".r1"))
	return []string{"filein" + suffix, "relin" + suffix},
		[]string{"linkdir" + suffix + "/secret", "indir" + suffix + "/inner", "fileout" + suffix, "chain" + suffix, "relout" + suffix}
}

// TestSymlinksNeverLeaveBasePath: the scan and on-demand loading follow
// the same rule: symlinked directories are never followed, symlinked
// files only if they resolve inside basePath. Nothing outside is served.
func TestSymlinksNeverLeaveBasePath(t *testing.T) {
	parent := t.TempDir()
	base, outside := filepath.Join(parent, "base"), filepath.Join(parent, "outside")
	secret := bytes.Repeat([]byte("S"), 4096)
	writeFile(t, filepath.Join(outside, "secret.r1"), secret)
	writeFile(t, filepath.Join(outside, "outfile.r1"), secret)
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "real", "inner.r1"), make([]byte, 8192))
	scanServed, scanRefused := symlinkSet(t, base, outside, "")

	ts := startServer(t, base, "", nil)
	for _, n := range append([]string{"img", "real/inner"}, scanServed...) {
		if ts.store.loaded(n, 1) == nil {
			t.Errorf("scan: %s not loaded", n)
		}
	}
	for _, n := range scanRefused {
		if ts.store.loaded(n, 1) != nil {
			t.Errorf("scan: %s loaded", n)
		}
	}

	// the same names on demand, and links that appeared after the scan
	odServed, odRefused := symlinkSet(t, base, outside, "2")
	for _, n := range append(scanServed, odServed...) {
		c := trySelect(t, ts.addr, n, 1)
		if c == nil {
			t.Errorf("on demand: %s refused", n)
			continue
		}
		c.Close()
	}
	for _, n := range append(scanRefused, odRefused...) {
		for _, rid := range []uint16{1, 0} {
			if c := trySelect(t, ts.addr, n, rid); c != nil {
				rep, data := getBlock(t, c, 0, 4096, 0, 1)
				c.Close()
				t.Errorf("on demand: %s rid %d served (%v, secret data %v)", n, rid, rep, bytes.Equal(data, secret))
			}
		}
	}
	for _, img := range ts.store.list() {
		if err := resolvesInside(base, img.Path); err != nil {
			t.Errorf("loaded %s: %v", img, err)
		}
	}
}

// TestSymlinkedBasePathIsScanned: basePath itself may be a symlink; the
// scan looks into it (filepath.WalkDir alone would not) and keeps paths
// below the configured basePath.
func TestSymlinkedBasePathIsScanned(t *testing.T) {
	parent := t.TempDir()
	writeFile(t, filepath.Join(parent, "real", "sub", "img.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(parent, "real", "other.r2"), make([]byte, 4096))
	symlink(t, filepath.Join(parent, "real", "other.r2"), filepath.Join(parent, "real", "alias.r1"))
	base := filepath.Join(parent, "link")
	symlink(t, "real", base)
	s := newStore(storeOptions{BasePath: base})
	defer s.Close()
	added, _, _, err := s.reload()
	if err != nil || added != 3 {
		t.Fatalf("scan of a symlinked basePath: %d images, %v", added, err)
	}
	if img := s.loaded("sub/img", 1); img == nil || img.Path != filepath.Join(base, "sub", "img.r1") {
		t.Fatalf("sub/img: %+v", img)
	}
}

// TestProxyDoesNotCloneThroughSymlinkedDir: a proxy asked for an image
// whose directory below its basePath is a symlink to elsewhere creates no
// local copy there.
func TestProxyDoesNotCloneThroughSymlinkedDir(t *testing.T) {
	originBase := t.TempDir()
	for _, d := range []string{"linkdir", "realdir"} {
		if err := os.MkdirAll(filepath.Join(originBase, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	genImage(t, originBase, "linkdir/new.r1", 64<<10, false)
	origin := runServer(t, originBase, "", nil, nil)
	parent := t.TempDir()
	base, outside := filepath.Join(parent, "base"), filepath.Join(parent, "outside")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	symlink(t, outside, filepath.Join(base, "linkdir"))
	proxy := startProxy(t, base, "", "", nil, origin.addr)
	if c := trySelect(t, proxy.addr, "linkdir/new", 1); c != nil {
		c.Close()
		t.Error("proxy served an image through a symlinked directory")
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("proxy wrote outside its basePath: %v", entries)
	}
	// sanity: the same image under a real directory name is cloned
	genImage(t, originBase, "realdir/new.r1", 64<<10, false)
	c := trySelect(t, proxy.addr, "realdir/new", 1)
	if c == nil {
		t.Fatal("realdir/new refused")
	}
	rep, _ := getBlock(t, c, 0, 4096, 0, 1)
	c.Close()
	if rep.Cmd != protocol.CmdGetBlock {
		t.Fatalf("reply %v", rep)
	}
}
