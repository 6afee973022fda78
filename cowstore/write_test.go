package cowstore

import (
	"bytes"
	"errors"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// TestWriteZeroes zeroes unaligned ranges over remote data, local data
// and the grown area: they read as zeros and the rest is untouched. A
// range that already reads as zeros (above the valid remote size, no
// local data) allocates no slot unless noHole asks for real zeros.
func TestWriteZeroes(t *testing.T) {
	remote := &memRemote{data: bytes.Repeat([]byte{0x33}, 3*cowformat.ClusterSize)}
	o := newSession(t, remote)
	m := &model{b: bytes.Clone(remote.data)}
	local := bytes.Repeat([]byte{0x44}, 3*cowformat.BlockSize)
	o.WriteAt(local, cowformat.ClusterSize+100)
	m.write(local, cowformat.ClusterSize+100)
	zero := func(off, n int64, noHole bool) {
		t.Helper()
		if err := o.WriteZeroes(off, n, noHole); err != nil {
			t.Fatalf("zero %d+%d: %v", off, n, err)
		}
		m.write(make([]byte, n), off)
	}
	zero(10, 5000, false)                                          // remote data, partial blocks
	zero(cowformat.ClusterSize+50, 2*cowformat.BlockSize, false)   // local data, unaligned
	zero(cowformat.ClusterSize-100, cowformat.ClusterSize+3, true) // across a cluster boundary
	check(t, o, m, "after zeroing")

	// above the valid remote size without local data: nothing to do
	if err := o.Resize(2 * cowformat.ClusterSize); err != nil {
		t.Fatal(err)
	}
	m.resize(2 * cowformat.ClusterSize)
	if err := o.Resize(5 * cowformat.ClusterSize); err != nil {
		t.Fatal(err)
	}
	m.resize(5 * cowformat.ClusterSize)
	slots := o.nextSlot
	zero(3*cowformat.ClusterSize, cowformat.ClusterSize, false)
	if o.nextSlot != slots {
		t.Errorf("zeroing a hole allocated a slot (nextClusterOffset %d -> %d)", slots, o.nextSlot)
	}
	zero(3*cowformat.ClusterSize, cowformat.ClusterSize, true)
	if o.nextSlot != slots+cowformat.ClusterSize {
		t.Errorf("zeroing with noHole: nextClusterOffset %d -> %d, want one new slot", slots, o.nextSlot)
	}
	check(t, o, m, "after zeroing the grown area")
	o.Close()
	if err := o.WriteZeroes(0, 1, false); !errors.Is(err, ErrClosed) {
		t.Errorf("zero after close: %v", err)
	}
}

// TestWriteAtFUAIsDurable: a FUA write is on disk when it returns, even if
// the power fails at once (only synced writes survive in the rebuilt
// session), while a plain write may not be.
func TestWriteAtFUAIsDurable(t *testing.T) {
	remote := &memRemote{data: bytes.Repeat([]byte{0x55}, 2*cowformat.ClusterSize)}
	rec := &ioRecorder{}
	src := t.TempDir()
	opts := Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1, wrapFile: rec.wrap}
	o, err := Create(src, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	plain := bytes.Repeat([]byte{0x66}, cowformat.BlockSize)
	fua := bytes.Repeat([]byte{0x77}, 100)
	if _, err := o.WriteAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	if n, err := o.WriteAtFUA(fua, cowformat.ClusterSize+10); err != nil || n != len(fua) {
		t.Fatalf("FUA write: %d %v", n, err)
	}
	dir := t.TempDir()
	rec.materialize(t, dir, rec.len(), func() bool { return false })
	writeRevision(dir, 1)
	writeName(dir, "img")
	opts.wrapFile = nil
	o2, err := Load(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer o2.Close()
	got := make([]byte, cowformat.BlockSize)
	o2.ReadAt(got, cowformat.ClusterSize)
	want := bytes.Clone(remote.data[cowformat.ClusterSize : cowformat.ClusterSize+cowformat.BlockSize])
	copy(want[10:], fua)
	if !bytes.Equal(got, want) {
		t.Fatal("the FUA write is not on disk after a power loss right after it returned")
	}
	// a FUA write also commits the plain writes before it
	o2.ReadAt(got, 0)
	if !bytes.Equal(got, plain) {
		t.Fatal("the plain write before the FUA write was not committed with it")
	}
}
