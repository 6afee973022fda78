package cowstore

import (
	"math/rand/v2"
	"testing"
)

// Local is truthful: whenever it says a request is local, doing the request
// reads nothing from the remote image. And it says so for what is plainly
// local: written blocks, the zeros above the valid remote size, aligned
// writes.
func TestLocalHint(t *testing.T) {
	remote := cowsrc() // 8 MiB
	o := newSession(t, remote)
	size := o.Size()
	if err := o.Resize(size + 4<<20); err != nil { // zeros above 8 MiB
		t.Fatal(err)
	}
	if _, err := o.WriteAt(make([]byte, 64<<10), 1<<20); err != nil { // blocks [1 MiB, +64 KiB) local
		t.Fatal(err)
	}
	cases := []struct {
		write   bool
		off, n  int64
		want    bool
		comment string
	}{
		{false, 1 << 20, 64 << 10, true, "read of written blocks"},
		{false, 1<<20 + 100, 5000, true, "unaligned read inside written blocks"},
		{false, 1<<20 - 1, 2, false, "read touching a remote block"},
		{false, size, 4096, true, "read above the valid remote size"},
		{false, size - 4096, 8192, false, "read straddling the valid remote size"},
		{true, 0, 4096, true, "aligned write of remote blocks"},
		{true, 100, 4096, false, "unaligned write over remote blocks"},
		{true, 1<<20 + 100, 4000, true, "unaligned write inside written blocks"},
		{true, size + 100, 100, true, "unaligned write above the valid remote size"},
	}
	for _, c := range cases {
		if got := o.Local(c.write, c.off, c.n); got != c.want {
			t.Errorf("%s: Local(%v, %d, %d) = %v", c.comment, c.write, c.off, c.n, got)
		}
	}

	rng := rand.New(rand.NewPCG(7, 8))
	for range 2000 {
		off := rng.Int64N(o.Size() - 1)
		n := min(rng.Int64N(256<<10)+1, o.Size()-off)
		write := rng.IntN(2) == 0
		if !o.Local(write, off, n) {
			if write && rng.IntN(4) == 0 { // grow the local part now and then
				o.WriteAt(make([]byte, n), off)
				waitReadAhead(o) // its remote reads may fetch ahead in the background
			}
			continue
		}
		before := remote.reads.Load()
		var err error
		if write {
			_, err = o.WriteAt(make([]byte, n), off)
		} else {
			_, err = o.ReadAt(make([]byte, n), off)
		}
		if err != nil {
			t.Fatal(err)
		}
		if remote.reads.Load() != before {
			t.Fatalf("Local(%v, %d, %d) said local, but the request read the remote image", write, off, n)
		}
	}
}

// waitReadAhead waits until the overlay's background fetches of the remote
// image have ended.
func waitReadAhead(o *Overlay) {
	ra := o.remote.(*readAhead)
	ra.mu.Lock()
	segs := append([]*segment(nil), ra.segs...)
	ra.mu.Unlock()
	for _, s := range segs {
		<-s.done
	}
}
