package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

// testL2 scales the layout down (original size 30,408,704, final size
// 51,380,224) so the whole standard test, verify and compare run in
// milliseconds. The real constants are tested in TestLayoutRealConstants
// and, on a sparse file, in TestStandardRealConstants.
const testL2 = 10 << 20

var scaled = "--l2-capacity=" + fmt.Sprint(testL2)

// fakeDevice plays a dnbd3go COW device on a regular file: the file is the
// COW session (exact size), the "device" shows the size rounded down to bs
// and accepts only block-aligned I/O into aligned memory, as O_DIRECT does.
type fakeDevice struct {
	f  *os.File
	bs int64
	// dropEvery, if > 0, silently drops every n-th write (a broken COW).
	dropEvery int
	writes    int
	// log records every request, to check their alignment.
	mu  sync.Mutex
	ops []string
}

func (d *fakeDevice) check(p []byte, off int64, op string) error {
	d.mu.Lock()
	d.ops = append(d.ops, fmt.Sprintf("%s %d+%d", op, off, len(p)))
	d.mu.Unlock()
	if off%d.bs != 0 || int64(len(p))%d.bs != 0 {
		return fmt.Errorf("fake device: unaligned %s of %d bytes at %d (block size %d)", op, len(p), off, d.bs)
	}
	if len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%512 != 0 {
		return fmt.Errorf("fake device: %s buffer not aligned", op)
	}
	size, _ := d.Size()
	if off+int64(len(p)) > size {
		return fmt.Errorf("fake device: %s [%d, %d) past the end (%d)", op, off, off+int64(len(p)), size)
	}
	return nil
}

func (d *fakeDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(p, off, "read"); err != nil {
		return 0, err
	}
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF {
		// The session file is at least as large as the device.
		return n, fmt.Errorf("fake device: short read")
	}
	return n, err
}

func (d *fakeDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(p, off, "write"); err != nil {
		return 0, err
	}
	d.writes++
	if d.dropEvery > 0 && d.writes%d.dropEvery == 0 {
		return len(p), nil
	}
	return d.f.WriteAt(p, off)
}

func (d *fakeDevice) Size() (int64, error) {
	fi, err := d.f.Stat()
	if err != nil {
		return 0, err
	}
	return roundDown(fi.Size(), d.bs), nil
}

func (d *fakeDevice) LogicalBlockSize() (int64, error) { return d.bs, nil }
func (d *fakeDevice) Sync() error                      { return nil }
func (d *fakeDevice) DropCache() error                 { return nil }
func (d *fakeDevice) Close() error                     { return d.f.Close() }

// testEnv is an env whose "devices" are regular files named *.dev, opened
// as fakeDevices with block size bs. devs collects them.
type testEnv struct {
	env
	out  bytes.Buffer
	bs   int64
	drop int
	devs []*fakeDevice
}

func newTestEnv(bs int64) *testEnv {
	te := &testEnv{bs: bs}
	te.env = env{
		stdout: &te.out,
		stderr: &te.out,
		final:  context.Background(),
		isDevice: func(path string, fi fs.FileInfo) bool {
			return strings.HasSuffix(path, ".dev") || isBlockDevice(path, fi)
		},
		openDevice: func(path string, write bool) (blockDevice, error) {
			f, err := openFile(path, write)
			if err != nil {
				return nil, err
			}
			d := &fakeDevice{f: f, bs: te.bs, dropEvery: te.drop}
			te.devs = append(te.devs, d)
			return d, nil
		},
	}
	return te
}

// run runs the command and returns the exit code and the output.
func (te *testEnv) run(t *testing.T, args ...string) (int, string) {
	t.Helper()
	te.out.Reset()
	code := run(context.Background(), args, &te.env)
	out := te.out.String()
	t.Logf("dnbd3-cowtest %s -> %d\n%s", strings.Join(args, " "), code, out)
	return code, out
}

// mustRun runs the command and fails the test unless it exits with want.
func (te *testEnv) mustRun(t *testing.T, want int, args ...string) string {
	t.Helper()
	code, out := te.run(t, args...)
	if code != want {
		t.Fatalf("dnbd3-cowtest %s: exit %d, want %d\n%s", strings.Join(args, " "), code, want, out)
	}
	return out
}

// resizeScript writes a fake "dnbd3-nbd" that implements "resize DEVICE
// SIZE" by truncating the session file and "resize DEVICE" as a successful
// check.
func resizeScript(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fake-dnbd3-nbd")
	script := `#!/bin/sh
[ "$1" = resize ] || { echo "unknown command $1" >&2; exit 2; }
[ $# -eq 2 ] && exit 0
[ $# -eq 3 ] || { echo "usage: resize DEVICE [SIZE]" >&2; exit 2; }
exec truncate -s "$3" "$2"
`
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeFilled writes a file of size bytes of v.
func writeFilled(t *testing.T, path string, size int64, v byte) {
	t.Helper()
	if err := os.WriteFile(path, filled(size, v), 0o600); err != nil {
		t.Fatal(err)
	}
}

// patchByte sets one byte of a file and returns the old value.
func patchByte(t *testing.T, path string, off int64, v byte) byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old := make([]byte, 1)
	if _, err := f.ReadAt(old, off); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{v}, off); err != nil {
		t.Fatal(err)
	}
	return old[0]
}

// fileSize returns a file's size.
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// copyFile copies src to dst.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// mustContain fails unless out contains every string.
func mustContain(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}
