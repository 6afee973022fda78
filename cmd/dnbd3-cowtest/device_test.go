package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResizer truncates the session file.
type fakeResizer struct {
	fail  bool
	calls []string
}

func (r *fakeResizer) Resize(_ context.Context, dev string, size int64) error {
	r.calls = append(r.calls, fmt.Sprintf("resize %d", size))
	if r.fail {
		return fmt.Errorf("not a COW device")
	}
	return os.Truncate(dev, size)
}

func (r *fakeResizer) Check(context.Context, string) error {
	if r.fail {
		return fmt.Errorf("not a COW device")
	}
	return nil
}

func newFakeTarget(t *testing.T, bs, size int64, rs resizer) (*deviceTarget, *fakeDevice, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	writeFilled(t, path, size, 0)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd := &fakeDevice{f: f, bs: bs}
	dt, err := newDeviceTarget(path, fd, rs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dt.Close() })
	return dt, fd, path
}

// Unaligned reads and writes through the bounce buffer match a byte-slice
// model, and the device only sees aligned requests.
func TestDeviceTargetIO(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			const size = 12 << 20
			dt, _, _ := newFakeTarget(t, bs, size, &fakeResizer{})
			model := make([]byte, size)
			rng := rand.New(rand.NewPCG(1, uint64(bs)))
			for i := range 400 {
				off := rng.Int64N(size)
				n := rng.Int64N(min(size-off, 64<<10)) + 1
				if i%50 == 0 {
					// Larger than the bounce buffer.
					off = rng.Int64N(1 << 20)
					n = bounceSize*2 + 777
				}
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if _, err := dt.WriteAt(p, off); err != nil {
					t.Fatalf("write %d+%d: %v", off, n, err)
				}
				copy(model[off:], p)
				roff := rng.Int64N(size)
				rn := rng.Int64N(min(size-roff, 64<<10)) + 1
				got := make([]byte, rn)
				if err := readFull(dt, got, roff); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, model[roff:roff+rn]) {
					t.Fatalf("read %d+%d differs from the model", roff, rn)
				}
			}
			all := make([]byte, size)
			if err := readFull(dt, all, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(all, model) {
				t.Fatal("the device differs from the model")
			}
			// Past the end: a read is short with io.EOF, a write fails.
			if n, err := dt.ReadAt(make([]byte, 10), size-4); n != 4 || err == nil {
				t.Errorf("read past the end: %d, %v", n, err)
			}
			if _, err := dt.WriteAt(make([]byte, 10), size-4); err == nil || !strings.Contains(err.Error(), "does not grow by writing") {
				t.Errorf("write past the end: %v", err)
			}
		})
	}
}

func TestDeviceTargetResize(t *testing.T) {
	rs := &fakeResizer{}
	dt, _, path := newFakeTarget(t, 4096, 1<<20, rs)
	if err := dt.Resize(context.Background(), 1<<20+5000); err != nil {
		t.Fatal(err)
	}
	if got, _ := dt.Size(); got != 1<<20+4096 {
		t.Errorf("device size %d after resize to %d", got, 1<<20+5000)
	}
	if got := fileSize(t, path); got != 1<<20+5000 {
		t.Errorf("session size %d", got)
	}
	if dt.VisibleSize(1<<20+5000) != 1<<20+4096 {
		t.Error("VisibleSize does not round down")
	}
	// After a success, a failure is a real error, not "unavailable".
	rs.fail = true
	err := dt.Resize(context.Background(), 4096)
	var unavailable *resizeUnavailableError
	if err == nil || errors.As(err, &unavailable) {
		t.Errorf("failure after a successful resize: %v", err)
	}

	// A device whose first resize fails: unavailable, remembered.
	rs2 := &fakeResizer{fail: true}
	dt2, _, _ := newFakeTarget(t, 512, 1<<20, rs2)
	err = dt2.Resize(context.Background(), 4096)
	if !errors.As(err, &unavailable) || !strings.Contains(err.Error(), "cannot resize") {
		t.Fatalf("first failure: %v", err)
	}
	if err := dt2.CheckResize(context.Background()); !errors.As(err, &unavailable) {
		t.Errorf("CheckResize after a failed resize: %v", err)
	}
	dt2.Resize(context.Background(), 8192)
	if len(rs2.calls) != 1 {
		t.Errorf("the resize command ran again after failing: %v", rs2.calls)
	}
}

// countOps counts the fake device's requests of kind op ("read", "write").
func countOps(d *fakeDevice, op string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, s := range d.ops {
		if strings.HasPrefix(s, op+" ") {
			n++
		}
	}
	return n
}

// A sequential unaligned writer (writeLongNonAlignedPattern's pattern)
// reads only the tail block of each write: the head block is the one the
// previous write ended with, and the target still has it.
func TestDeviceTargetSequentialUnalignedReads(t *testing.T) {
	const chunk, chunks = 40960, 50
	dt, fd, path := newFakeTarget(t, 4096, 4<<20, &fakeResizer{})
	model := make([]byte, 4<<20)
	off := int64(4095)
	for i := range chunks {
		p := bytes.Repeat([]byte{byte(i + 1)}, chunk)
		if _, err := dt.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
		off += chunk
	}
	// the first write reads its head and its tail, every later one only its tail
	if r, w := countOps(fd, "read"), countOps(fd, "write"); r != chunks+1 || w != chunks {
		t.Errorf("%d reads and %d writes for %d sequential unaligned writes, want %d and %d", r, w, chunks, chunks+1, chunks)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the device differs from the model")
	}
}

// A resize forgets the last written block: after a shrink and a regrow the
// device reads zeros there, and an unaligned write into that block must
// keep them.
func TestDeviceTargetResizeForgetsLastBlock(t *testing.T) {
	dt, fd, path := newFakeTarget(t, 4096, 1<<20, &fakeResizer{})
	if _, err := dt.WriteAt(bytes.Repeat([]byte{7}, 8192), 8192); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := dt.Resize(ctx, 8192); err != nil {
		t.Fatal(err)
	}
	if err := dt.Resize(ctx, 1<<20); err != nil {
		t.Fatal(err)
	}
	reads := countOps(fd, "read")
	if _, err := dt.WriteAt([]byte{9}, 12288+100); err != nil {
		t.Fatal(err)
	}
	if countOps(fd, "read") != reads+1 {
		t.Error("the write into the last written block did not read it from the device after a resize")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 1<<20)
	want[12288+100] = 9
	if !bytes.Equal(got, want) {
		t.Error("data written before the shrink came back after the regrow")
	}
}
