package cowstore

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// memRemote is a remote image in memory that counts its reads.
type memRemote struct {
	data  []byte
	reads atomic.Int64
}

func (m *memRemote) ReadAt(p []byte, off int64) (int, error) {
	m.reads.Add(1)
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memRemote) Size() int64 { return int64(len(m.data)) }

// fixtureDir copies ../shared/testdata/cow-session-v3 (meta, data) into a
// temporary directory; meta is copied sparsely.
func fixtureDir(t *testing.T, metaName string) string {
	t.Helper()
	src := testutil.Testdata(t, "cow-session-v3")
	dir := t.TempDir()
	var meta []byte
	var err error
	if metaName == "meta-before-unmount.gz" {
		meta = gunzip(t, filepath.Join(src, metaName))
	} else {
		meta, err = os.ReadFile(filepath.Join(src, "meta"))
		if err != nil {
			t.Fatal(err)
		}
	}
	writeSparse(t, filepath.Join(dir, "meta"), meta)
	data, err := os.ReadFile(filepath.Join(src, "data"))
	if err != nil {
		t.Fatal(err)
	}
	writeSparse(t, filepath.Join(dir, "data"), data)
	return dir
}

func gunzip(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(z)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeSparse writes b skipping 4 KiB pages of zeros.
func writeSparse(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := make([]byte, 4096)
	for off := 0; off < len(b); off += 4096 {
		page := b[off:min(off+4096, len(b))]
		if !bytes.Equal(page, zero[:len(page)]) {
			if _, err := f.WriteAt(page, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
}

// cowsrc is the fixture's server image: 8 MiB of the generator rule.
func cowsrc() *memRemote { return &memRemote{data: testutil.GenImage(0, 8388608)} }

// fixedClock returns a Now function that always says t.
func fixedClock(sec int64) func() time.Time { return func() time.Time { return time.Unix(sec, 0) } }

func readAll(t *testing.T, o *Overlay) []byte {
	t.Helper()
	b := make([]byte, o.Size())
	if n, err := o.ReadAt(b, 0); n != len(b) || (err != nil && err != io.EOF) {
		t.Fatalf("read %d of %d: %v", n, len(b), err)
	}
	return b
}

func newSession(t *testing.T, remote Remote) *Overlay {
	t.Helper()
	o, err := Create(t.TempDir(), Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}
