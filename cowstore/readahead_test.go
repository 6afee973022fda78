package cowstore

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
)

// countingRemote is an in-memory remote image that records its reads and
// can fail reads at chosen offsets.
type countingRemote struct {
	data   []byte
	mu     sync.Mutex
	reads  []string
	failAt map[int64]bool
}

func (r *countingRemote) Size() int64 { return int64(len(r.data)) }

func (r *countingRemote) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.reads = append(r.reads, fmt.Sprintf("%d+%d", off, len(p)))
	fail := r.failAt[off]
	r.mu.Unlock()
	if fail {
		return 0, errors.New("injected remote failure")
	}
	return copy(p, r.data[off:]), nil
}

func (r *countingRemote) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.reads...)
}

func newCountingRemote(size int) *countingRemote {
	d := make([]byte, size)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range d {
		d[i] = byte(rng.Uint32())
	}
	return &countingRemote{data: d, failAt: map[int64]bool{}}
}

// A sequential reader of 1,310,720-byte pieces (each split in two requests,
// as the kernel splits them at 1 MiB, which arrive in any order) gets the
// right bytes, and after the first pieces most of them come from segments
// fetched ahead.
func TestReadAheadSequential(t *testing.T) {
	for _, order := range []string{"concurrent", "first-second", "second-first"} {
		t.Run(order, func(t *testing.T) { testReadAheadSequential(t, order) })
	}
}

func testReadAheadSequential(t *testing.T, order string) {
	const size, piece = 24<<20 + 12345, 1310720
	r := newCountingRemote(size)
	ra := newReadAhead(r)
	for off := int64(0); off < size; off += piece {
		n := min(piece, size-off)
		got := make([]byte, n)
		first := min(n, 1<<20)
		var wg sync.WaitGroup
		var err1, err2 error
		one := func() { _, err1 = ra.ReadAt(got[:first], off) }
		two := func() { _, err2 = ra.ReadAt(got[first:], off+first) }
		switch order {
		case "concurrent":
			wg.Go(one)
			wg.Go(two)
			wg.Wait()
		case "first-second":
			one()
			two()
		default:
			two()
			one()
		}
		if err1 != nil || err2 != nil {
			t.Fatalf("read at %d: %v %v", off, err1, err2)
		}
		if !bytes.Equal(got, r.data[off:off+n]) {
			t.Fatalf("read at %d: wrong bytes", off)
		}
	}
	pieces := (size + piece - 1) / piece
	if ra.hits.Load() < uint64(pieces) {
		t.Errorf("%d segment hits for %d sequential pieces: the read-ahead is not used", ra.hits.Load(), pieces)
	}
	// every segment is fetched at most about once: the remote image is not
	// read much more than once in all
	var total int64
	for _, s := range r.log() {
		var o, n int64
		fmt.Sscanf(s, "%d+%d", &o, &n)
		total += n
	}
	if total > size+4*raSegment {
		t.Errorf("%d bytes read from the remote image for %d: %v", total, size, r.log())
	}
}

// Random reads pass through unchanged: one remote read of the same range
// each, nothing fetched ahead.
func TestReadAheadRandomPassThrough(t *testing.T) {
	const size = 64 << 20
	r := newCountingRemote(size)
	ra := newReadAhead(r)
	rng := rand.New(rand.NewPCG(5, 6))
	want := 0
	for i := range 400 {
		// each read is at least 4 MiB away from the one before
		off := (int64(i)*5*raSegment + rng.Int64N(raSegment)) % (size - 2*raSegment)
		n := rng.Int64N(8192) + 1
		got := make([]byte, n)
		if _, err := ra.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, r.data[off:off+n]) {
			t.Fatalf("read %d+%d: wrong bytes", off, n)
		}
		want++
	}
	if got := len(r.log()); got != want || ra.fetched.Load() != 0 {
		t.Errorf("%d remote reads (%d segments fetched ahead) for %d random reads", got, ra.fetched.Load(), want)
	}
}

// A failed fetch ahead is not an error for the reader: it reads the
// remote image itself and gets the bytes, or the remote's error.
func TestReadAheadFailedFetch(t *testing.T) {
	const size = 8 << 20
	r := newCountingRemote(size)
	r.failAt[2*raSegment] = true // the fetch of segment 2
	ra := newReadAhead(r)
	buf := make([]byte, raSegment/2)
	for off := int64(0); off < 2*raSegment; off += int64(len(buf)) {
		if _, err := ra.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	// segment 2 failed ahead; reading it fails too (the remote fails there)
	if _, err := ra.ReadAt(buf, 2*raSegment); err == nil {
		t.Fatal("a read where the remote fails succeeded")
	}
	r.mu.Lock()
	r.failAt = map[int64]bool{}
	r.mu.Unlock()
	if _, err := ra.ReadAt(buf, 2*raSegment); err != nil {
		t.Fatalf("read after the remote recovered: %v", err)
	}
	if !bytes.Equal(buf, r.data[2*raSegment:2*raSegment+len(buf)]) {
		t.Fatal("wrong bytes after a failed fetch ahead")
	}
}

// Blocks written to the overlay are read from the data file even where
// the read-ahead holds the remote bytes of their segment: a sequential
// reader that goes on into the segments fetched ahead, which were written
// meanwhile, gets what was written, and the remote bytes around it
// (served from the segments).
func TestReadAheadNeverServesWrittenBlocks(t *testing.T) {
	remote := cowsrc() // 8 MiB
	o := newSession(t, remote)
	want := bytes.Clone(remote.data)
	const piece = 64 << 10
	readSeq := func(from, to int64) {
		t.Helper()
		got := make([]byte, piece)
		for off := from; off < to; off += piece {
			if _, err := o.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want[off:off+piece]) {
				t.Fatalf("read at %d: wrong bytes", off)
			}
		}
	}
	readSeq(0, 2<<20) // fetches segments 2 and 3 ahead
	waitReadAhead(o)
	ra := o.remote.(*readAhead)
	writes := [][2]int64{{2<<20 + 1000, 5000}, {3<<20 - 10, 20}, {3<<20 + 4096, 4096}, {4<<20 - 100, 100}}
	for _, w := range writes {
		if s := ra.lookup(w[0] / raSegment); s == nil || !s.ok {
			t.Fatalf("segment %d is not held: the test does not cover a cached segment", w[0]/raSegment)
		}
	}
	rng := rand.New(rand.NewPCG(11, 12))
	for _, w := range writes {
		p := make([]byte, w[1])
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if _, err := o.WriteAt(p, w[0]); err != nil {
			t.Fatal(err)
		}
		copy(want[w[0]:], p)
	}
	hits := ra.hits.Load()
	readSeq(2<<20, 4<<20)
	if ra.hits.Load() == hits {
		t.Error("the reads after the writes used no read-ahead segment: the test does not cover it")
	}
}
