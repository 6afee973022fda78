package cowstore

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// FuzzLoad patches a valid session's meta and data files with arbitrary
// bytes (a torn write, a foreign or corrupt session) and reopens it:
// Load must refuse it with an error or return an overlay whose reads stay
// in range, never panic.
//
// The input is a list of patches: file (even: meta, odd: data), a 24-bit
// offset into the first 16 MiB (header, L1, first L2 tables, first slots),
// a length byte and that many bytes.
func FuzzLoad(f *testing.F) {
	remote := &memRemote{data: testutil.GenImage(0, 2*cowformat.ClusterSize+777)}
	patch := func(file byte, off int, b ...byte) []byte {
		return append([]byte{file, byte(off), byte(off >> 8), byte(off >> 16), byte(len(b))}, b...)
	}
	f.Add([]byte{})
	f.Add(patch(0, 0, 0x5f))                                         // bad magic
	f.Add(patch(0, cowformat.StartL1, 9, 0, 0, 0))                   // L1 beyond nextL2
	f.Add(patch(0, cowformat.StartL2, 0, 0, 0, 0, 0, 0, 0x40))       // slot far away
	f.Add(patch(0, cowformat.StartL2, 0, 0, 0xE8, 0x03, 0, 0, 0, 0)) // slot 50 beyond nextClusterOffset: ignored
	f.Add(patch(1, 0, 0))                                            // data magic
	f.Fuzz(func(t *testing.T, patches []byte) {
		dir := t.TempDir()
		o, err := Create(dir, Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		o.WriteAt([]byte("changed"), cowformat.ClusterSize-3)
		o.WriteAt([]byte("more"), 2*cowformat.ClusterSize+100)
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		files := [2]*os.File{}
		for i, name := range []string{"meta", "data"} {
			if files[i], err = os.OpenFile(filepath.Join(dir, name), os.O_WRONLY, 0); err != nil {
				t.Fatal(err)
			}
		}
		for len(patches) >= 5 {
			file := patches[0] & 1
			off := int64(binary.LittleEndian.Uint32(append(patches[1:4:4], 0)))
			n := min(int(patches[4]), len(patches)-5)
			files[file].WriteAt(patches[5:5+n], off)
			patches = patches[5+n:]
		}
		files[0].Close()
		files[1].Close()
		o, err = Load(dir, Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1})
		if err != nil {
			return
		}
		defer o.Close()
		size := o.Size()
		if size < 0 || size > cowformat.MaxImageSize {
			t.Fatalf("loaded size %d", size)
		}
		buf := make([]byte, 64<<10)
		for _, off := range []int64{0, cowformat.ClusterSize - 4096, 2 * cowformat.ClusterSize, size - 1} {
			if off < 0 || off >= size {
				continue
			}
			n := min(int64(len(buf)), size-off)
			if _, err := o.ReadAt(buf[:n], off); err != nil {
				// a slot outside the data file reads short: an error is fine, a panic is not
				continue
			}
		}
	})
}
