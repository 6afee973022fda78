package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestProxyCacheNotWritable: a proxy that cannot write its cache says so
// at ERROR: an incomplete image whose copy cannot be written shows
// problems 2 (write) in the RPC from the start, and a copy that cannot be
// created is an ERROR, not an INFO "lookup failed".
func TestProxyCacheNotWritable(t *testing.T) {
	obase := t.TempDir()
	os.Mkdir(filepath.Join(obase, "lab"), 0o755)
	genImage(t, obase, "lab/new.r1", 1<<20, false)
	origin := runServer(t, obase, "", nil, nil)

	base := t.TempDir()
	writeFile(t, filepath.Join(base, "ro", "old.r1"), make([]byte, 1<<20))
	writeFile(t, filepath.Join(base, "ro", "old.r1.map"), make([]byte, mapLen(1<<20)))
	os.Mkdir(filepath.Join(base, "lab"), 0o755)
	testutil.ReadOnlyDir(t, filepath.Join(base, "ro"))
	testutil.ReadOnlyDir(t, filepath.Join(base, "lab"))
	dir, cfg := writeConfigDir(t, base, proxyConf, map[string]string{altServersFileName: altServersFor(origin.addr)})
	log, lc := captureLogger(t)
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	addr, cancel, done := serveTest(t, srv, "127.0.0.1:0")
	defer func() { cancel(); <-done }()

	var rpc struct {
		Images []struct {
			Name     string `json:"name"`
			Problems uint32 `json:"problems"`
		} `json:"images"`
	}
	queryJSON(t, addr, "q=images", &rpc)
	if len(rpc.Images) != 1 || rpc.Images[0].Name != "ro/old" || rpc.Images[0].Problems&problemWrite == 0 {
		t.Errorf("RPC images %+v: want ro/old with problems bit 2 (write)", rpc.Images)
	}
	if !strings.Contains(lc.String(), `level=ERROR msg="cannot write the local copy of an incomplete image`) {
		t.Errorf("no ERROR about the unwritable copy:\n%s", lc.String())
	}

	c := dial(t, addr)
	if _, ok := selectFlags(t, c, "lab/new", 1, 0); ok {
		t.Fatal("image selected although its copy cannot be created")
	}
	if !strings.Contains(lc.String(), `level=ERROR msg="cannot create the local copy of an image`) {
		t.Errorf("no ERROR about the copy that cannot be created:\n%s", lc.String())
	}
	if strings.Contains(lc.String(), `level=INFO msg="upstream lookup failed"`) {
		t.Errorf("a local write failure logged as INFO:\n%s", lc.String())
	}
}
