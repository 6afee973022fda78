package cowstore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// model is what the overlay must behave like: a resizable file whose
// initial content is the remote image.
type model struct{ b []byte }

func (m *model) write(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.resize(end)
	}
	copy(m.b[off:], p)
}

func (m *model) resize(n int64) {
	if n <= int64(len(m.b)) {
		m.b = m.b[:n]
		return
	}
	m.b = append(m.b, make([]byte, n-int64(len(m.b)))...)
}

func check(t *testing.T, o *Overlay, m *model, what string) {
	t.Helper()
	if o.Size() != int64(len(m.b)) {
		t.Fatalf("%s: size %d, model %d", what, o.Size(), len(m.b))
	}
	got := readAll(t, o)
	if !bytes.Equal(got, m.b) {
		for i := range got {
			if got[i] != m.b[i] {
				t.Fatalf("%s: byte %d (block %d) = %#x, want %#x", what, i, i/cowformat.BlockSize, got[i], m.b[i])
			}
		}
	}
}

// TestRandomOperationsMatchFileSemantics applies random unaligned writes,
// shrinks, grows and reloads to a session and to the model.
func TestRandomOperationsMatchFileSemantics(t *testing.T) {
	for seed := uint64(1); seed <= 4; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 99))
			remote := &memRemote{data: testutil.GenImage(0, 3*cowformat.ClusterSize+12345)}
			dir := t.TempDir()
			opts := Options{Remote: remote, ImageName: "img", RID: 2, CommitInterval: -1}
			o, err := Create(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			m := &model{b: append([]byte(nil), remote.data...)}
			for step := range 300 {
				size := int64(len(m.b))
				switch r := rng.IntN(100); {
				case r < 8: // resize around the current size, often unaligned
					n := max(0, size+rng.Int64N(3*cowformat.ClusterSize)-cowformat.ClusterSize-rng.Int64N(5000))
					if err := o.Resize(n); err != nil {
						t.Fatal(err)
					}
					m.resize(n)
				case r < 10: // reload from disk
					if err := o.Close(); err != nil {
						t.Fatal(err)
					}
					if o, err = Load(dir, opts); err != nil {
						t.Fatal(err)
					}
				default:
					off := rng.Int64N(size + 3*cowformat.BlockSize)
					n := 1 + rng.IntN(3*cowformat.BlockSize)
					if rng.IntN(4) == 0 {
						n = 1 + rng.IntN(2*cowformat.ClusterSize)
					}
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.UintN(256))
					}
					if k, err := o.WriteAt(p, off); err != nil || k != n {
						t.Fatalf("step %d: write %d+%d: %d %v", step, off, n, k, err)
					}
					m.write(p, off)
				}
				if step%25 == 0 {
					check(t, o, m, fmt.Sprintf("step %d", step))
				}
			}
			check(t, o, m, "end")
			o.Close()
		})
	}
}

// TestPartialBlockBugsFixed replays the two partial-block bugs of the
// reference (cow-format.md §6 and §13) and requires the correct result.
func TestPartialBlockBugsFixed(t *testing.T) {
	remote := &memRemote{data: bytes.Repeat([]byte{0x2A}, 8_388_608)}
	// (a) truncate to 8,380,000, grow, write 1 byte at 8,380,100: the head
	// of the block [8,376,320, 8,380,416) keeps the original bytes
	o := newSession(t, remote)
	o.Resize(8_380_000)
	o.Resize(8_388_608)
	o.WriteAt([]byte{1}, 8_380_100)
	got := make([]byte, 4096)
	o.ReadAt(got, 8_376_320)
	for i, b := range got {
		want := byte(0x2A)
		switch {
		case 8_376_320+i == 8_380_100:
			want = 1
		case 8_376_320+i >= 8_380_000:
			want = 0
		}
		if b != want {
			t.Fatalf("bug (a): byte %d of the block = %#x, want %#x", i, b, want)
		}
	}
	// (b) shrink to 8,387,608 (inside a block) then a 1-byte write 100
	// bytes into that block: its bytes before the valid end stay original
	o2 := newSession(t, remote)
	o2.Resize(8_387_608)
	block := int64(8_387_608 / 4096 * 4096)
	o2.WriteAt([]byte{7}, block+100)
	got2 := make([]byte, 8_387_608-block)
	o2.ReadAt(got2, block)
	for i, b := range got2 {
		want := byte(0x2A)
		if i == 100 {
			want = 7
		}
		if b != want {
			t.Fatalf("bug (b): byte %d = %#x, want %#x", i, b, want)
		}
	}
}

// TestConcurrentWritersSameBlock has many goroutines write disjoint byte
// ranges of the same blocks and clusters (partial blocks, read-modify-
// write, new slots): no write may be lost and no slot orphaned.
func TestConcurrentWritersSameBlock(t *testing.T) {
	remote := &memRemote{data: testutil.GenImage(0, 4*cowformat.ClusterSize)}
	o := newSession(t, remote)
	m := append([]byte(nil), remote.data...)
	var wg sync.WaitGroup
	const writers = 32
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 64 {
				// each writer owns bytes with offset % writers == w in a few blocks
				base := int64(i%8) * (cowformat.ClusterSize / 2)
				off := base + int64(w)*7 + int64(i)*writers*7
				if _, err := o.WriteAt([]byte{byte(w), byte(i)}, off); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	for w := range writers {
		for i := range 64 {
			base := int64(i%8) * (cowformat.ClusterSize / 2)
			off := base + int64(w)*7 + int64(i)*writers*7
			m[off], m[off+1] = byte(w), byte(i)
		}
	}
	wg.Wait()
	if got := readAll(t, o); !bytes.Equal(got, m) {
		t.Fatal("a concurrent write was lost")
	}
	slots := 0
	o.forEachSlot(func(int, *entry) { slots++ })
	if want := int64(cowformat.FirstSlot + slots*cowformat.ClusterSize); o.nextSlot != want {
		t.Fatalf("nextClusterOffset %d, want %d for %d slots: a slot was orphaned", o.nextSlot, want, slots)
	}
}

func TestLimitsAndClose(t *testing.T) {
	o := newSession(t, &memRemote{data: make([]byte, 8192)})
	if err := o.Resize(cowformat.MaxImageSize + 1); !errors.Is(err, ErrTooLarge) {
		t.Errorf("resize beyond 10^12: %v", err)
	}
	if _, err := o.WriteAt([]byte{1}, cowformat.MaxImageSize); !errors.Is(err, ErrTooLarge) {
		t.Errorf("write beyond 10^12: %v", err)
	}
	if err := o.Resize(cowformat.MaxImageSize); err != nil {
		t.Errorf("resize to 10^12: %v", err)
	}
	if _, err := o.WriteAt([]byte{9}, cowformat.MaxImageSize-1); err != nil {
		t.Errorf("last byte: %v", err)
	}
	b := []byte{0}
	if _, err := o.ReadAt(b, cowformat.MaxImageSize-1); err != nil || b[0] != 9 {
		t.Errorf("read last byte: %v %v", b, err)
	}
	if _, err := o.ReadAt(b, cowformat.MaxImageSize); err != io.EOF {
		t.Errorf("read past end: %v", err)
	}
	o.Close()
	if _, err := o.WriteAt(b, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
}

// TestLoadRefusesForeignOrCorrupt covers the checks the reference skips and
// the ones it does.
func TestLoadRefusesForeignOrCorrupt(t *testing.T) {
	remote := &memRemote{data: testutil.GenImage(0, 2*cowformat.ClusterSize)}
	mk := func() string {
		dir := t.TempDir()
		o, err := Create(dir, Options{Remote: remote, ImageName: "img", RID: 3, CommitInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		o.WriteAt([]byte("x"), 5)
		o.Close()
		return dir
	}
	good := Options{Remote: remote, ImageName: "img", RID: 3}
	patch := func(dir, file string, off int64, b []byte) {
		f, _ := os.OpenFile(filepath.Join(dir, file), os.O_WRONLY, 0)
		f.WriteAt(b, off)
		f.Close()
	}
	le32 := func(v int32) []byte { b := make([]byte, 4); le.PutUint32(b, uint32(v)); return b }
	le64 := func(v int64) []byte { b := make([]byte, 8); le.PutUint64(b, uint64(v)); return b }
	for _, c := range []struct {
		name  string
		mod   func(dir string)
		opts  Options
		error string
	}{
		{"other image", nil, Options{Remote: remote, ImageName: "other", RID: 3}, "belongs to image"},
		{"other revision", nil, Options{Remote: remote, ImageName: "img", RID: 4}, "revision 3"},
		{"remote too small", nil, Options{Remote: &memRemote{data: make([]byte, 4096)}, ImageName: "img", RID: 3}, "valid bytes"},
		{"bad magic", func(d string) { patch(d, "meta", 0, []byte{1}) }, good, "bad magic"},
		{"byte-swapped", func(d string) { patch(d, "meta", 0, le64(int64(bits.ReverseBytes64(cowformat.MetaMagic)))) }, good, "byte order"},
		{"version", func(d string) { patch(d, "meta", 16, le32(2)) }, good, "version 2"},
		{"bitfield size", func(d string) { patch(d, "meta", 40, le32(80)) }, good, "bitfield"},
		{"L1 beyond the tables", func(d string) { patch(d, "meta", cowformat.StartL1+4*5, le32(cowformat.L1Entries)) }, good, "not a table index"},
		{"slot not on a boundary", func(d string) { patch(d, "meta", cowformat.StartL2, le64(50*cowformat.ClusterSize+4096)) }, good, "not a slot boundary"},
		{"data magic", func(d string) { patch(d, "data", 0, []byte{0}) }, good, "data file"},
		{"truncated meta", func(d string) { os.Truncate(filepath.Join(d, "meta"), 1000) }, good, "header"},
		{"no data", func(d string) { os.Remove(filepath.Join(d, "data")) }, good, "data"},
	} {
		dir := mk()
		if c.mod != nil {
			c.mod(dir)
		}
		o, err := Load(dir, c.opts)
		if err == nil {
			o.Close()
			t.Errorf("%s: loaded", c.name)
			continue
		}
		if !strings.Contains(err.Error(), c.error) {
			t.Errorf("%s: error %q lacks %q", c.name, err, c.error)
		}
	}
	// and an intact one loads
	o, err := Load(mk(), good)
	if err != nil {
		t.Fatal(err)
	}
	o.Close()
	// a second session in the same directory is refused
	dir := mk()
	if _, err := Create(dir, good); err == nil || !strings.Contains(err.Error(), "-L") {
		t.Errorf("create over a session: %v", err)
	}
}
