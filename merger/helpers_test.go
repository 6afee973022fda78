package merger

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// env is a set of merger directories for one test.
type env struct {
	t                *testing.T
	work, orig, dest string
	cfg              Config
	originals        map[string][]byte // "name.rN" -> content
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{t: t, work: filepath.Join(root, "work"), orig: filepath.Join(root, "orig"), dest: filepath.Join(root, "dest"),
		originals: make(map[string][]byte)}
	for _, d := range []string{e.work, e.orig, e.dest} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.cfg = Config{WorkingDirectory: e.work, OriginalImageDirectory: e.orig, DestinationDirectory: e.dest,
		Logger: testutil.Logger(t)}
	return e
}

// original writes <orig>/<name>.r<rev> with content.
func (e *env) original(name string, rev int, content []byte) {
	e.t.Helper()
	p := filepath.Join(e.orig, fmt.Sprintf("%s.r%d", name, rev))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(p, content, 0o644); err != nil {
		e.t.Fatal(err)
	}
	e.originals[fmt.Sprintf("%s.r%d", name, rev)] = content
}

// manager creates and starts a Manager on e's directories; it is closed
// when the test ends. configure, if not nil, runs before Start.
func (e *env) manager(configure func(*Manager)) *Manager {
	e.t.Helper()
	m, err := NewManager(e.cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	if configure != nil {
		configure(m)
	}
	if err := m.Start(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	return m
}

// destFile returns the content of <dest>/<name>, or nil if it is absent.
func (e *env) destFile(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(e.dest, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// waitFinished polls Status until the session is Done or Failed.
func waitFinished(t *testing.T, m *Manager, id string) SessionInfo {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := m.Status(id)
		if err != nil {
			t.Fatalf("status: %v", err)
		}
		if info.State == StateDone || info.State == StateFailed {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("session %s still %s after 30 s", id, info.State)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// mergeDone merges a session and waits for the merge, failing the test
// unless the request is accepted and the session ends Done.
func mergeDone(t *testing.T, m *Manager, id string, originalFileSize, newFileSize int64) SessionInfo {
	t.Helper()
	if _, err := m.Merge(id, originalFileSize, newFileSize); err != nil {
		t.Fatal(err)
	}
	st := waitFinished(t, m, id)
	if st.State != StateDone {
		t.Fatalf("merge of %s: %s (%+v)", id, st.Error, st)
	}
	return st
}

// crashAt returns a Manager configuration whose merges stop at the
// given crash point as if the process had died there, and a channel
// closed when that happened.
func crashAt(point string) (configure func(*Manager), crashed <-chan struct{}) {
	c := make(chan struct{})
	return func(m *Manager) {
		m.hook = func(p, _ string) error {
			if p == point {
				close(c)
				return errSimulatedCrash
			}
			return nil
		}
	}, c
}

// randBytes returns n pseudo-random bytes.
func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// upload is one upload as the test model records it: the cluster's
// complete new content (320 blocks; nil for blocks whose bit is clear).
type upload struct {
	cluster int
	blocks  [cowformat.ClusterBlocks][]byte
}

// bitfield returns the upload's bitfield.
func (u *upload) bitfield() [cowformat.BitfieldSize]byte {
	var bf [cowformat.BitfieldSize]byte
	for i, b := range u.blocks {
		if b != nil {
			bf[i/8] |= 1 << (i % 8)
		}
	}
	return bf
}

// update encodes u for the Service, sparse or full.
func (u *upload) update(full bool) Update {
	up := Update{Cluster: u.cluster, Bitfield: u.bitfield(), Full: full}
	if full {
		up.Blocks = make([]byte, cowformat.ClusterSize)
		for i, b := range u.blocks {
			if b != nil {
				copy(up.Blocks[i*cowformat.BlockSize:], b)
			} else {
				// garbage where the bit is clear: it must be ignored
				copy(up.Blocks[i*cowformat.BlockSize:], bytes.Repeat([]byte{0xEE}, cowformat.BlockSize))
			}
		}
		return up
	}
	for _, b := range u.blocks {
		if b != nil {
			up.Blocks = append(up.Blocks, b...)
		}
	}
	return up
}

// randomUpload returns an upload of cluster with each block present
// with probability density.
func randomUpload(rng *rand.Rand, cluster int, density float64) *upload {
	u := &upload{cluster: cluster}
	for i := range u.blocks {
		if rng.Float64() < density {
			u.blocks[i] = randBytes(rng, cowformat.BlockSize)
		}
	}
	return u
}

// expectedImage is the test's own model of a merge: the original cut or
// zero-extended to originalFileSize, each cluster's latest upload's
// blocks written on top (extending as needed), then cut or extended to
// newFileSize.
func expectedImage(original []byte, uploads []*upload, originalFileSize, newFileSize int64) []byte {
	latest := make(map[int]*upload)
	for _, u := range uploads {
		latest[u.cluster] = u
	}
	img := make([]byte, originalFileSize)
	copy(img, original)
	for c, u := range latest {
		for i, b := range u.blocks {
			if b == nil {
				continue
			}
			off := int64(c)*cowformat.ClusterSize + int64(i)*cowformat.BlockSize
			if need := off + cowformat.BlockSize; need > int64(len(img)) {
				img = append(img, make([]byte, need-int64(len(img)))...)
			}
			copy(img[off:], b)
		}
	}
	if int64(len(img)) >= newFileSize {
		return img[:newFileSize]
	}
	return append(img, make([]byte, newFileSize-int64(len(img)))...)
}

// sameBytes fails the test with the first difference of got and want.
func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: first difference at offset %d (block %d of cluster %d): got %#x, want %#x",
				what, i, i%cowformat.ClusterSize/cowformat.BlockSize, i/cowformat.ClusterSize, got[i], want[i])
		}
	}
}

// mustUpdate uploads u.
func mustUpdate(t *testing.T, m *Manager, id string, u *upload, full bool) {
	t.Helper()
	if err := m.Update(id, u.update(full)); err != nil {
		t.Fatalf("update cluster %d: %v", u.cluster, err)
	}
}

// noTempFiles fails if a merge temporary file is left anywhere.
func (e *env) noTempFiles() {
	e.t.Helper()
	for _, root := range []string{e.work, e.dest} {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			name := strings.TrimSuffix(d.Name(), crcSuffix)
			if err == nil && !d.IsDir() && (name == mergeTempName || filepath.Ext(name) == ".merging") {
				e.t.Errorf("temporary file left: %s", p)
			}
			return nil
		})
	}
}

// allocated returns the disk space a file uses.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
