package client

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

// doneChan is a ReadTarget that delivers the outcome on a channel.
type doneChan chan error

func (d doneChan) ReadDone(err error) { d <- err }

// TestStartReadMatchesReadAt starts batches of asynchronous reads (some
// split into several requests, some through the local wait queue) and
// checks every byte; then one across a failover and errors.
func TestStartReadMatchesReadAt(t *testing.T) {
	t.Parallel()
	data := genImage(6<<20, 9)
	a, b := startPair(t, data)
	cfg := fastConfig(t, "test", a.Addr(), b.Addr())
	cfg.MaxRequest = 128 << 10
	cfg.MaxInflight = 8
	img := openT(t, cfg)
	want := padded(data)
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 20 {
		type rd struct {
			off int64
			buf []byte
			ch  doneChan
		}
		var batch []rd
		for range 1 + rng.IntN(16) {
			n := 1 + rng.IntN(600<<10)
			off := rng.Int64N(int64(len(want) - n))
			r := rd{off: off, buf: make([]byte, n), ch: make(doneChan, 1)}
			img.StartRead(r.buf, r.off, r.ch)
			batch = append(batch, r)
		}
		img.SendStarted()
		if round == 10 {
			a.Kill() // the batch in flight fails over to B
		}
		for _, r := range batch {
			select {
			case err := <-r.ch:
				if err != nil {
					t.Fatalf("round %d: read of %d at %d: %v", round, len(r.buf), r.off, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: read of %d at %d did not complete", round, len(r.buf), r.off)
			}
			checkRange(t, want, r.buf, r.off)
			select {
			case err := <-r.ch:
				t.Fatalf("ReadDone called twice (%v)", err)
			default:
			}
		}
	}
	if img.Stats().Current != b.Addr() {
		t.Fatalf("did not fail over: %+v", img.Stats())
	}
	// out of range, empty
	ch := make(doneChan, 1)
	img.StartRead(make([]byte, 10), img.Size()-5, ch)
	if err := <-ch; err == nil {
		t.Fatal("read past the end started")
	}
	img.StartRead(nil, 0, ch)
	if err := <-ch; err != nil {
		t.Fatalf("empty read: %v", err)
	}
}

// TestStartReadDeadlineAndClose: reads with no server fail at the
// deadline; reads pending at Close fail with ErrClosed, each once.
func TestStartReadDeadlineAndClose(t *testing.T) {
	t.Parallel()
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(1<<20, 3)})
	cfg := fastConfig(t, "test", srv.Addr())
	cfg.Deadline = 300 * time.Millisecond
	img := openT(t, cfg)
	srv.Kill()
	ch := make(doneChan, 2)
	img.StartRead(make([]byte, 8192), 4096, ch)
	img.SendStarted()
	select {
	case err := <-ch:
		if !errors.Is(err, ErrDeadline) {
			t.Fatalf("read with the server dead: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("deadline did not fire")
	}

	cfg.Deadline = 0
	srv2 := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(1<<20, 3)})
	cfg.Servers = []string{srv2.Addr()}
	img2 := openT(t, cfg)
	srv2.Update(func(b *dnbd3test.Behavior) { b.BlockDelay = time.Hour })
	chs := make([]doneChan, 5)
	for k := range chs {
		chs[k] = make(doneChan, 2)
		img2.StartRead(make([]byte, 300<<10), int64(k)*4096, chs[k])
	}
	img2.SendStarted()
	img2.Close()
	for _, ch := range chs {
		if err := <-ch; !errors.Is(err, ErrClosed) {
			t.Fatalf("read pending at Close: %v", err)
		}
		if len(ch) != 0 {
			t.Fatal("ReadDone called twice")
		}
	}
	img2.StartRead(make([]byte, 10), 0, ch)
	if err := <-ch; !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

// TestStartReadAfterReadAtHops: an asynchronous read that reuses a pooled
// request of a ReadAtHops read sends hop count 0, not the old one.
func TestStartReadAfterReadAtHops(t *testing.T) {
	t.Parallel()
	data := genImage(256<<10, 31)
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	img := openT(t, fastConfig(t, "test", srv.Addr()))
	buf := make([]byte, 4096)
	for k := 0; k < 4; k++ {
		if _, err := img.ReadAtHops(context.Background(), buf, int64(k)*4096, 3); err != nil {
			t.Fatalf("ReadAtHops: %v", err)
		}
	}
	if got := srv.HopBlocks(); got != 4 {
		t.Fatalf("server saw %d requests with hops, want 4", got)
	}
	for k := 0; k < 4; k++ {
		done := make(doneChan, 1)
		img.StartRead(buf, int64(k)*4096, done)
		img.SendStarted()
		if err := <-done; err != nil {
			t.Fatalf("StartRead: %v", err)
		}
		checkRange(t, data, buf, int64(k)*4096)
	}
	if got := srv.HopBlocks(); got != 4 {
		t.Fatalf("server saw %d requests with hops after the asynchronous reads, want 4", got)
	}
}

// TestStartReadAllocations: the asynchronous read path of the kernel
// bridge allocates no more per 4 KiB read than ReadAt does (the one
// allocation counted is the test server's reply; the client makes none).
func TestStartReadAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector (sync.Pool drops items)")
	}
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(1<<20, 0)})
	img := openT(t, fastConfig(t, "test", srv.Addr()))
	buf := make([]byte, 4096)
	done := make(doneChan, 1)
	read := func() {
		img.StartRead(buf, 8192, done)
		img.SendStarted()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	read()
	if allocs := testing.AllocsPerRun(200, read); allocs > 1 {
		t.Fatalf("%.1f allocations per 4 KiB StartRead, want <= 1", allocs)
	}
}
