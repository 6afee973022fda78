package nbdbridge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

func engTestRandom(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// TestEngineRandomMix drives several connections with many requests in
// flight each (random READ/WRITE/FUA/TRIM/WRITE_ZEROES/FLUSH, random
// backend delays) and checks every reply against an in-memory model.
func TestEngineRandomMix(t *testing.T) {
	for _, mode := range []string{"optional-interfaces", "fallbacks", "async-reads"} {
		t.Run(mode, func(t *testing.T) {
			engTestNoLeak(t)
			engTestRandomMix(t, mode)
		})
	}
}

func engTestRandomMix(t *testing.T, mode string) {
	const (
		size     = 16 << 20
		nConns   = 4
		lanes    = 4 // per connection, each owning a region
		slotSize = 32 << 10
		batch    = 8 // requests in flight per lane
		rounds   = 60
	)
	initial := engTestRandom(1, size)
	mem := NewMemoryBackendFrom(bytes.Clone(initial))
	slow := &engTestSlow{m: mem, maxDelay: 300 * time.Microsecond}
	var b Backend = slow
	var async *engTestAsync
	switch mode {
	case "fallbacks":
		b = &engTestPlain{b: b}
	case "async-reads":
		async = &engTestAsync{engTestSlow: slow}
		b = async
	}
	e := NewEngine(b, EngineOptions{Workers: 16, Logger: engTestLogger(t)})
	defer e.Close()
	model := bytes.Clone(initial)
	region := size / (nConns * lanes)

	type counts struct{ reads, writes, trims, zeroes, flushes uint64 }
	var mu sync.Mutex
	var total counts
	clients := make([]*engTestClient, nConns)
	results := make([]<-chan error, nConns)
	for i := range clients {
		clients[i], results[i] = engTestServe(t, context.Background(), e)
	}
	var wg sync.WaitGroup
	for l := range nConns * lanes {
		c := clients[l%nConns]
		base := l * region
		rng := rand.New(rand.NewPCG(uint64(l), 7))
		wg.Go(func() {
			var cnt counts
			defer func() {
				mu.Lock()
				total.reads += cnt.reads
				total.writes += cnt.writes
				total.trims += cnt.trims
				total.zeroes += cnt.zeroes
				total.flushes += cnt.flushes
				mu.Unlock()
			}()
			slots := region / slotSize
			for round := range rounds {
				type op struct {
					typ      uint16
					off, n   int
					data     []byte
					ch       <-chan engTestReply
					expected []byte
				}
				var ops []op
				for _, s := range rng.Perm(slots)[:batch] {
					o := op{}
					o.off = base + s*slotSize + rng.IntN(slotSize/2)
					o.n = 1 + rng.IntN(base+(s+1)*slotSize-o.off)
					if rng.IntN(3) == 0 { // aligned 4 KiB requests, like the kernel's
						o.off = base + s*slotSize + 4096*rng.IntN(slotSize/4096-1)
						o.n = 4096
					}
					var flags uint16
					switch k := rng.IntN(20); {
					case k < 8:
						o.typ = wireCmdRead
						o.expected = bytes.Clone(model[o.off : o.off+o.n])
					case k < 14:
						o.typ = wireCmdWrite
						o.data = engTestRandom(uint64(round*1000+s+l<<20), o.n+8)[:o.n]
						if k >= 12 {
							flags = wireCmdFlagFUA
						}
					case k < 16:
						o.typ = wireCmdTrim
						if k == 15 {
							flags = wireCmdFlagFUA
						}
					case k < 19:
						o.typ = wireCmdWriteZeroes
						if k == 17 {
							flags = wireCmdFlagNoHole
						}
						if k == 18 {
							flags = wireCmdFlagFUA
						}
					default:
						o.typ = wireCmdFlush
					}
					if o.typ == wireCmdFlush {
						_, o.ch = c.send(o.typ, 0, 0, 0, nil)
					} else {
						_, o.ch = c.send(o.typ, flags, uint64(o.off), uint32(o.n), o.data)
					}
					ops = append(ops, o)
				}
				for _, o := range ops {
					r, ok := <-o.ch
					if !ok {
						t.Errorf("lane %d: connection ended", l)
						return
					}
					if r.errno != 0 {
						t.Errorf("lane %d: %s %d+%d: %s", l, commandName(o.typ), o.off, o.n, errnoName(r.errno))
						return
					}
					switch o.typ {
					case wireCmdRead:
						cnt.reads++
						if !bytes.Equal(r.data, o.expected) {
							t.Errorf("lane %d: READ %d+%d returned wrong data", l, o.off, o.n)
							return
						}
					case wireCmdWrite:
						cnt.writes++
						copy(model[o.off:], o.data)
					case wireCmdTrim:
						cnt.trims++
						if mode != "fallbacks" { // MemoryBackend's Trim zeroes; without a Trimmer TRIM is a no-op
							clear(model[o.off : o.off+o.n])
						}
					case wireCmdWriteZeroes:
						cnt.zeroes++
						clear(model[o.off : o.off+o.n])
					case wireCmdFlush:
						cnt.flushes++
					}
				}
			}
		})
	}
	wg.Wait()
	var ooo int64
	for i, c := range clients {
		ooo += c.outOfOrder.Load()
		c.disc()
		if err := engTestResult(t, results[i]); !errors.Is(err, ErrDisconnected) {
			t.Errorf("ServeConn after DISC: %v, want ErrDisconnected", err)
		}
	}
	if t.Failed() {
		return
	}
	if ooo == 0 {
		t.Error("no reply overtook an earlier request: replies are not out of order")
	}
	t.Logf("%d replies arrived out of order", ooo)
	if !bytes.Equal(mem.Bytes(), model) {
		t.Error("backend contents differ from the model")
	}
	st := e.Stats()
	want := EngineStats{TotalConnections: nConns, Reads: total.reads, Writes: total.writes, Trims: total.trims,
		WriteZeroes: total.zeroes, Flushes: total.flushes, BytesRead: st.BytesRead, BytesWritten: st.BytesWritten}
	if st != want {
		t.Errorf("stats %+v, want %+v", st, want)
	}
	if st.BytesRead == 0 || st.BytesWritten == 0 {
		t.Errorf("byte counters not counted: %+v", st)
	}
	if p, ok := b.(*engTestPlain); ok && p.flushes.Load() < int64(total.flushes) {
		t.Errorf("backend saw %d flushes, clients sent %d", p.flushes.Load(), total.flushes)
	}
	if async != nil {
		// every READ went the asynchronous way, submitted in bursts
		if async.started.Load() == 0 || async.sends.Load() == 0 || async.started.Load() < int64(total.reads) {
			t.Errorf("asynchronous reads: %d started, %d submissions, %d reads answered", async.started.Load(), async.sends.Load(), total.reads)
		}
		t.Logf("%d asynchronous reads in %d submissions", async.started.Load(), async.sends.Load())
	}
	if err := e.Wait(context.Background()); err != nil {
		t.Error(err)
	}
}

// TestEngineFlushCoversAckedWrites checks the FLUSH ordering rule: every
// write acknowledged (on any connection) before a FLUSH was sent, and
// every write sent before it on the same connection, completed in the
// backend before the Flush of that FLUSH ran. Writes keep running on all
// connections while the FLUSHes (one at a time, so that the n-th Flush
// call belongs to the n-th FLUSH) are processed.
func TestEngineFlushCoversAckedWrites(t *testing.T) {
	engTestNoLeak(t)
	rec := &engTestRecorder{m: NewMemoryBackend(4 << 20), maxDelay: 2 * time.Millisecond}
	e := NewEngine(rec, EngineOptions{Workers: 32})
	defer e.Close()
	const nConns = 3
	clients := make([]*engTestClient, nConns)
	results := make([]<-chan error, nConns)
	for i := range clients {
		clients[i], results[i] = engTestServe(t, context.Background(), e)
	}

	var mu sync.Mutex
	acked := map[uint64]bool{}
	var nextID uint64
	var mustCover [][]uint64 // per FLUSH
	var wg sync.WaitGroup
	for round := range 30 {
		// A burst of writes on every connection...
		sentOn := make([][]uint64, nConns)
		for ci, c := range clients {
			for range 10 {
				nextID++
				id := nextID
				payload := make([]byte, 4096)
				for i := range 8 {
					payload[i] = byte(id >> (56 - 8*i))
				}
				_, ch := c.send(wireCmdWrite, 0, (id%1000)*4096, 4096, payload)
				sentOn[ci] = append(sentOn[ci], id)
				wg.Go(func() {
					if r, ok := <-ch; ok && r.errno == 0 {
						mu.Lock()
						acked[id] = true
						mu.Unlock()
					}
				})
			}
		}
		// ...wait a moment so that some are acknowledged, then FLUSH on
		// one connection while the others are still in flight.
		time.Sleep(time.Duration(rand.N(2000)) * time.Microsecond)
		ci := round % nConns
		mu.Lock()
		cover := append([]uint64(nil), sentOn[ci]...)
		for id := range acked {
			cover = append(cover, id)
		}
		mu.Unlock()
		mustCover = append(mustCover, cover)
		engTestExpect(t, "FLUSH", clients[ci].do(wireCmdFlush, 0, 0, 0, nil), 0)
	}
	wg.Wait()
	for _, c := range clients {
		c.disc()
	}
	for _, r := range results {
		engTestResult(t, r)
	}

	rec.mu.Lock()
	defer rec.mu.Unlock()
	completedAt := map[uint64]int{}
	var flushAt []int
	for i, ev := range rec.events {
		if ev.flush {
			flushAt = append(flushAt, i)
		} else {
			completedAt[ev.id] = i
		}
	}
	if len(flushAt) < len(mustCover) {
		t.Fatalf("backend saw %d Flush calls for %d FLUSH requests", len(flushAt), len(mustCover))
	}
	checked := 0
	for n, cover := range mustCover {
		for _, id := range cover {
			at, ok := completedAt[id]
			if !ok {
				t.Fatalf("write %d never completed", id)
			}
			if at > flushAt[n] {
				t.Fatalf("FLUSH %d: write %d completed after the Flush call", n, id)
			}
			checked++
		}
	}
	t.Logf("%d FLUSHes checked against %d required writes (%d writes in all)", len(mustCover), checked, nextID)
}

// TestEngineFlushWaitsForEarlierWrites holds a write in the backend and
// checks that a FLUSH received after it does not call Flush before the
// write completed, while a FLUSH is not blocked by writes received later.
func TestEngineFlushWaitsForEarlierWrites(t *testing.T) {
	engTestNoLeak(t)
	gate := make(chan struct{})
	var order []string
	var mu sync.Mutex
	b := &engTestHookBackend{MemoryBackend: NewMemoryBackend(1 << 20),
		write: func() {
			<-gate
			mu.Lock()
			order = append(order, "write")
			mu.Unlock()
		},
		flush: func() {
			mu.Lock()
			order = append(order, "flush")
			mu.Unlock()
		}}
	e := NewEngine(b, EngineOptions{})
	defer e.Close()
	c1, res1 := engTestServe(t, context.Background(), e)
	c2, res2 := engTestServe(t, context.Background(), e)
	_, wch := c1.send(wireCmdWrite, 0, 0, 512, make([]byte, 512))
	time.Sleep(20 * time.Millisecond) // the write is received and blocked
	_, fch := c2.send(wireCmdFlush, 0, 0, 0, nil)
	select {
	case <-fch:
		t.Fatal("FLUSH answered while an earlier write was still running")
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	engTestExpect(t, "WRITE", c1.wait(wch), 0)
	engTestExpect(t, "FLUSH", c2.wait(fch), 0)
	mu.Lock()
	if len(order) != 2 || order[0] != "write" || order[1] != "flush" {
		t.Errorf("backend call order %v, want [write flush]", order)
	}
	mu.Unlock()
	c1.disc()
	c2.disc()
	engTestResult(t, res1)
	engTestResult(t, res2)
}

type engTestHookBackend struct {
	*MemoryBackend
	write, flush func()
}

func (h *engTestHookBackend) WriteAt(p []byte, off int64) (int, error) {
	h.write()
	return h.MemoryBackend.WriteAt(p, off)
}
func (h *engTestHookBackend) Flush() error { h.flush(); return h.MemoryBackend.Flush() }

func TestEngineFUA(t *testing.T) {
	engTestNoLeak(t)
	t.Run("FUAWriter", func(t *testing.T) {
		b := &engTestFUA{MemoryBackend: NewMemoryBackend(1 << 20)}
		e := NewEngine(b, EngineOptions{})
		defer e.Close()
		c, res := engTestServe(t, context.Background(), e)
		engTestExpect(t, "WRITE FUA", c.do(wireCmdWrite, wireCmdFlagFUA, 0, 4, []byte("abcd")), 0)
		engTestExpect(t, "WRITE", c.do(wireCmdWrite, 0, 4, 4, []byte("efgh")), 0)
		if n := b.fuaWrites.Load(); n != 1 {
			t.Errorf("WriteAtFUA called %d times, want 1", n)
		}
		if f := b.Flushes(); f != 0 {
			t.Errorf("Flush called %d times for a FUA write on a FUAWriter, want 0", f)
		}
		if got := b.Bytes()[:8]; string(got) != "abcdefgh" {
			t.Errorf("backend holds %q", got)
		}
		c.disc()
		engTestResult(t, res)
	})
	t.Run("WriteAt+Flush", func(t *testing.T) {
		p := &engTestPlain{b: NewMemoryBackend(2 << 20)}
		e := NewEngine(p, EngineOptions{})
		defer e.Close()
		c, res := engTestServe(t, context.Background(), e)
		engTestExpect(t, "WRITE FUA", c.do(wireCmdWrite, wireCmdFlagFUA, 0, 4, []byte("abcd")), 0)
		if w, f := p.writes.Load(), p.flushes.Load(); w != 1 || f != 1 {
			t.Errorf("after a FUA write: %d WriteAt, %d Flush; want 1, 1", w, f)
		}
		engTestExpect(t, "WRITE_ZEROES FUA", c.do(wireCmdWriteZeroes, wireCmdFlagFUA, 0, 3<<20/2, nil), 0)
		if f := p.flushes.Load(); f != 2 {
			t.Errorf("WRITE_ZEROES with FUA: %d Flush calls, want 2", f)
		}
		if w := p.writes.Load(); w != 3 { // 1.5 MiB of zeros in 1 MiB chunks
			t.Errorf("WRITE_ZEROES fallback made %d WriteAt calls, want 2 more", w-1)
		}
		r := c.do(wireCmdRead, 0, 0, 3<<20/2, nil)
		if !bytes.Equal(r.data, make([]byte, 3<<20/2)) {
			t.Error("WRITE_ZEROES fallback did not write zeros")
		}
		engTestExpect(t, "TRIM FUA", c.do(wireCmdTrim, wireCmdFlagFUA, 0, 4096, nil), 0)
		c.disc()
		engTestResult(t, res)
	})
}

func TestEngineBackendErrors(t *testing.T) {
	engTestNoLeak(t)
	mem := NewMemoryBackendFrom(engTestRandom(3, 1<<20))
	want := mem.Bytes()
	for _, tc := range []struct {
		err   error
		errno uint32
	}{
		{errEngTestInjected, wireEIO},
		{context.DeadlineExceeded, wireEIO},
		{fmt.Errorf("write: %w", syscall.ENOSPC), wireENOSPC},
		{fmt.Errorf("overlay: %w", ErrReadOnly), wireEPERM},
		{&fsPathError{syscall.EDQUOT}, wireENOSPC},
	} {
		f := &engTestFail{MemoryBackend: mem, badOff: 8192, badLen: 4096, err: tc.err}
		e := NewEngine(f, EngineOptions{})
		c, res := engTestServe(t, context.Background(), e)
		// Errors come without payload: the next reply parses correctly.
		engTestExpect(t, "READ of the bad block", c.do(wireCmdRead, 0, 8192, 4096, nil), tc.errno)
		r := c.do(wireCmdRead, 0, 0, 8192, nil)
		engTestExpect(t, "READ after an error", r, 0)
		if !bytes.Equal(r.data, want[:8192]) {
			t.Fatal("READ after an error returned wrong data")
		}
		engTestExpect(t, "WRITE of the bad block", c.do(wireCmdWrite, 0, 10000, 10, make([]byte, 10)), tc.errno)
		engTestExpect(t, "READ after a failed write", c.do(wireCmdRead, 0, 0, 16, nil), 0)
		st := e.Stats()
		if st.Errors != 2 || st.BackendErrors != 2 {
			t.Errorf("stats count %d errors (%d backend), want 2 (2)", st.Errors, st.BackendErrors)
		}
		c.disc()
		engTestResult(t, res)
		e.Close()
	}

	t.Run("short read", func(t *testing.T) {
		e := NewEngine(engTestShort{mem}, EngineOptions{})
		defer e.Close()
		c, res := engTestServe(t, context.Background(), e)
		engTestExpect(t, "short READ", c.do(wireCmdRead, 0, 0, 4096, nil), wireEIO)
		engTestExpect(t, "empty READ", c.do(wireCmdRead, 0, 0, 0, nil), 0)
		c.disc()
		engTestResult(t, res)
	})
	t.Run("flush error", func(t *testing.T) {
		f := &engTestFail{MemoryBackend: NewMemoryBackend(4096), badOff: -1, flushErr: errEngTestInjected}
		e := NewEngine(f, EngineOptions{})
		defer e.Close()
		c, res := engTestServe(t, context.Background(), e)
		engTestExpect(t, "FLUSH", c.do(wireCmdFlush, 0, 0, 0, nil), wireEIO)
		engTestExpect(t, "WRITE", c.do(wireCmdWrite, 0, 0, 1, []byte{1}), 0)
		c.disc()
		engTestResult(t, res)
	})
}

// fsPathError wraps an errno the way os.PathError does.
type fsPathError struct{ errno syscall.Errno }

func (e *fsPathError) Error() string { return "write data: " + e.errno.Error() }
func (e *fsPathError) Unwrap() error { return e.errno }

func TestEngineReadOnly(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(4, 1<<20)
	for _, viaOption := range []bool{false, true} {
		mem := NewMemoryBackendFrom(bytes.Clone(data))
		if !viaOption {
			mem.SetReadOnly(true)
		}
		e := NewEngine(mem, EngineOptions{ReadOnly: viaOption})
		if !e.ReadOnly() {
			t.Fatal("engine not read-only")
		}
		if f := e.Flags(); f != wireFlagHasFlags|wireFlagReadOnly|wireFlagCanMultiConn {
			t.Errorf("read-only flags %s", FormatFlags(f))
		}
		c, res := engTestServe(t, context.Background(), e)
		engTestExpect(t, "WRITE", c.do(wireCmdWrite, 0, 0, 4096, bytes.Repeat([]byte{0xee}, 4096)), wireEPERM)
		engTestExpect(t, "WRITE FUA", c.do(wireCmdWrite, wireCmdFlagFUA, 0, 100, make([]byte, 100)), wireEPERM)
		engTestExpect(t, "TRIM", c.do(wireCmdTrim, 0, 0, 4096, nil), wireEPERM)
		engTestExpect(t, "WRITE_ZEROES", c.do(wireCmdWriteZeroes, 0, 0, 4096, nil), wireEPERM)
		engTestExpect(t, "FLUSH", c.do(wireCmdFlush, 0, 0, 0, nil), 0)
		r := c.do(wireCmdRead, 0, 0, 8192, nil) // the WRITE payloads were drained
		engTestExpect(t, "READ", r, 0)
		if !bytes.Equal(r.data, data[:8192]) || !bytes.Equal(mem.Bytes(), data) {
			t.Error("read-only export changed or read wrong")
		}
		c.disc()
		if err := engTestResult(t, res); !errors.Is(err, ErrDisconnected) {
			t.Errorf("ServeConn: %v", err)
		}
		if mem.Flushes() != 0 {
			t.Errorf("read-only backend flushed %d times", mem.Flushes())
		}
		e.Close()
	}
}

func TestEngineInvalidRequests(t *testing.T) {
	engTestNoLeak(t)
	const size = 1 << 20
	data := engTestRandom(5, size)
	mem := NewMemoryBackendFrom(bytes.Clone(data))
	e := NewEngine(mem, EngineOptions{MaxRequest: 64 << 10})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	big := make([]byte, 64<<10+1)
	for _, tc := range []struct {
		what    string
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload []byte
		want    uint32
	}{
		{"READ beyond the end", wireCmdRead, 0, size - 10, 11, nil, wireEINVAL},
		{"READ starting beyond the end", wireCmdRead, 0, size + 4096, 1, nil, wireEINVAL},
		{"READ with offset overflow", wireCmdRead, 0, ^uint64(0) - 5, 100, nil, wireEINVAL},
		{"READ over MaxRequest", wireCmdRead, 0, 0, 64<<10 + 1, nil, wireEINVAL},
		{"READ with DF flag", wireCmdRead, 1 << 2, 0, 512, nil, wireEINVAL},
		{"WRITE beyond the end", wireCmdWrite, 0, size - 2, 4, []byte{1, 2, 3, 4}, wireENOSPC},
		{"WRITE with offset overflow", wireCmdWrite, 0, ^uint64(0), 4, []byte{1, 2, 3, 4}, wireENOSPC},
		{"WRITE over MaxRequest", wireCmdWrite, 0, 0, uint32(len(big)), big, wireEINVAL},
		{"WRITE with NO_HOLE", wireCmdWrite, wireCmdFlagNoHole, 0, 4, []byte{1, 2, 3, 4}, wireEINVAL},
		{"TRIM beyond the end", wireCmdTrim, 0, size, 1, nil, wireENOSPC},
		{"WRITE_ZEROES beyond the end", wireCmdWriteZeroes, 0, size - 1, 2, nil, wireENOSPC},
		{"WRITE_ZEROES with unknown flag", wireCmdWriteZeroes, 1 << 5, 0, 2, nil, wireEINVAL},
		{"FLUSH with NO_HOLE", wireCmdFlush, wireCmdFlagNoHole, 0, 0, nil, wireEINVAL},
		{"CACHE (5)", 5, 0, 0, 4096, nil, wireEINVAL},
		{"BLOCK_STATUS (7)", 7, 0, 0, 4096, nil, wireEINVAL},
		{"unknown command 0xffff", 0xffff, 0, 0, 1 << 31, nil, wireEINVAL},
		{"READ of nothing", wireCmdRead, 0, size, 0, nil, 0},
		{"WRITE of nothing", wireCmdWrite, 0, 0, 0, nil, 0},
		{"READ with FUA", wireCmdRead, wireCmdFlagFUA, 0, 1, nil, 0},
	} {
		r := c.do(tc.typ, tc.flags, tc.off, tc.length, tc.payload)
		engTestExpect(t, tc.what, r, tc.want)
		// The stream stays in sync.
		r = c.do(wireCmdRead, 0, 4096, 4096, nil)
		if r.errno != 0 || !bytes.Equal(r.data, data[4096:8192]) {
			t.Fatalf("after %s: the next READ failed or returned wrong data", tc.what)
		}
	}
	if !bytes.Equal(mem.Bytes(), data) {
		t.Error("invalid requests changed the export")
	}
	if st := e.Stats(); st.Errors != 16 || st.BackendErrors != 0 {
		t.Errorf("stats: %d errors, %d backend errors; want 16, 0", st.Errors, st.BackendErrors)
	}
	c.disc()
	engTestResult(t, res)
}

func TestEngineAbsurdWriteClosesConnection(t *testing.T) {
	engTestNoLeak(t)
	e := NewEngine(NewMemoryBackend(1<<20), EngineOptions{MaxRequest: 64 << 10})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	c.send(wireCmdWrite, 0, 0, 1<<30, nil) // announces 1 GiB, sends nothing
	if err := engTestResult(t, res); err == nil || errors.Is(err, ErrDisconnected) {
		t.Fatalf("ServeConn: %v, want a protocol error", err)
	}
	<-c.done
}

func TestEngineBadMagicClosesConnection(t *testing.T) {
	engTestNoLeak(t)
	e := NewEngine(NewMemoryBackend(1<<20), EngineOptions{})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	engTestExpect(t, "READ", c.do(wireCmdRead, 0, 0, 512, nil), 0)
	c.sendRaw(protocol.TransmissionRequestHeader{RequestMagic: 0x12345678, Type: wireCmdRead, Length: 512}, nil)
	err := engTestResult(t, res)
	if !errors.Is(err, errBadRequestMagic) {
		t.Fatalf("ServeConn: %v, want bad magic", err)
	}
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		t.Fatal("connection not closed after a bad magic")
	}
}

// TestEngineDiscWaitsAndFlushes: DISC with requests in flight answers them
// all, flushes, and only then closes.
func TestEngineDiscWaitsAndFlushes(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(6, 1<<20)
	g := &engTestGate{MemoryBackend: NewMemoryBackendFrom(bytes.Clone(data)), gate: make(chan struct{})}
	e := NewEngine(g, EngineOptions{})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	var chans []<-chan engTestReply
	for i := range 8 {
		_, ch := c.send(wireCmdRead, 0, uint64(i)*4096, 4096, nil)
		chans = append(chans, ch)
	}
	engTestExpect(t, "WRITE", c.do(wireCmdWrite, 0, 1<<19, 4, []byte("dnbd")), 0)
	c.disc()
	deadline := time.Now().Add(5 * time.Second)
	for g.started.Load() < 8 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-res:
		t.Fatalf("ServeConn returned (%v) with reads in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	if g.Flushes() != 0 {
		t.Fatal("flushed before the requests in flight completed")
	}
	close(g.gate)
	for i, ch := range chans {
		r := c.wait(ch)
		if r.errno != 0 || !bytes.Equal(r.data, data[i*4096:(i+1)*4096]) {
			t.Errorf("READ %d after DISC: %s or wrong data", i, errnoName(r.errno))
		}
	}
	if err := engTestResult(t, res); !errors.Is(err, ErrDisconnected) {
		t.Errorf("ServeConn: %v, want ErrDisconnected", err)
	}
	if g.Flushes() != 1 {
		t.Errorf("DISC flushed %d times, want 1", g.Flushes())
	}
	<-c.done // closed
}

// TestEngineEOFFlushesDirty: a connection that wrote and ends without
// DISC is flushed; ServeConn reports io.EOF.
func TestEngineEOFFlushesDirty(t *testing.T) {
	engTestNoLeak(t)
	mem := NewMemoryBackend(1 << 20)
	e := NewEngine(mem, EngineOptions{})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	engTestExpect(t, "WRITE", c.do(wireCmdWrite, 0, 0, 1, []byte{7}), 0)
	c.conn.Close()
	if err := engTestResult(t, res); !errors.Is(err, io.EOF) || errors.Is(err, ErrDisconnected) {
		t.Errorf("ServeConn: %v, want io.EOF", err)
	}
	if mem.Flushes() != 1 {
		t.Errorf("%d flushes, want 1", mem.Flushes())
	}
}

// TestEngineShutdown: cancelling the context or closing the engine ends
// every connection after answering what is in flight; Wait returns.
func TestEngineShutdown(t *testing.T) {
	engTestNoLeak(t)
	t.Run("context", func(t *testing.T) {
		data := engTestRandom(7, 1<<20)
		g := &engTestGate{MemoryBackend: NewMemoryBackendFrom(data), gate: make(chan struct{})}
		e := NewEngine(g, EngineOptions{})
		ctx, cancel := context.WithCancel(context.Background())
		c, res := engTestServe(t, ctx, e)
		_, ch := c.send(wireCmdRead, 0, 0, 4096, nil)
		for g.started.Load() < 1 {
			time.Sleep(time.Millisecond)
		}
		cancel()
		time.Sleep(20 * time.Millisecond)
		close(g.gate)
		if r := c.wait(ch); r.errno != 0 || !bytes.Equal(r.data, data[:4096]) {
			t.Errorf("request in flight at shutdown: %s", errnoName(r.errno))
		}
		if err := engTestResult(t, res); !errors.Is(err, context.Canceled) {
			t.Errorf("ServeConn: %v, want context.Canceled", err)
		}
		if err := e.Wait(context.Background()); err != nil {
			t.Error(err)
		}
	})
	t.Run("Close", func(t *testing.T) {
		e := NewEngine(NewMemoryBackend(1<<20), EngineOptions{})
		var res []<-chan error
		for range 3 {
			c, r := engTestServe(t, context.Background(), e)
			engTestExpect(t, "READ", c.do(wireCmdRead, 0, 0, 1, nil), 0)
			res = append(res, r)
		}
		if s := e.Stats(); s.Connections != 3 {
			t.Errorf("%d connections, want 3", s.Connections)
		}
		e.Close()
		for _, r := range res {
			if err := engTestResult(t, r); !errors.Is(err, ErrEngineClosed) {
				t.Errorf("ServeConn: %v, want ErrEngineClosed", err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		srv, _ := engTestSocketPair(t)
		if err := e.ServeConn(context.Background(), srv); !errors.Is(err, ErrEngineClosed) {
			t.Errorf("ServeConn after Close: %v", err)
		}
		if s := e.Stats(); s.Connections != 0 || s.InFlight != 0 {
			t.Errorf("after Close: %+v", s)
		}
	})
	t.Run("client not reading", func(t *testing.T) {
		// The client floods READs and never reads a reply: the engine's
		// writer blocks, its limiter stops the reader; a cancel must still
		// end ServeConn (after the shutdown grace period at most).
		e := NewEngine(NewMemoryBackend(32<<20), EngineOptions{})
		e.grace = 300 * time.Millisecond
		defer e.Close()
		srv, cli := engTestSocketPair(t)
		ctx, cancel := context.WithCancel(context.Background())
		res := make(chan error, 1)
		go func() { res <- e.ServeConn(ctx, srv) }()
		go func() {
			var b [wireRequestSize]byte
			for i := 0; ; i++ {
				putRequest(b[:], protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
					Type: wireCmdRead, Handle: uint64(i), Offset: uint64(i%32) << 20, Length: 1 << 20})
				if _, err := cli.Write(b[:]); err != nil {
					return
				}
			}
		}()
		time.Sleep(100 * time.Millisecond)
		if s := e.Stats(); s.InFlight == 0 || s.InFlight > connMaxInFlight {
			t.Errorf("in flight: %d", s.InFlight)
		}
		start := time.Now()
		cancel()
		if err := engTestResult(t, res); err == nil {
			t.Error("ServeConn returned nil")
		}
		if d := time.Since(start); d > e.grace+2*time.Second {
			t.Errorf("shutdown took %v", d)
		}
		cli.Close()
	})
}

// TestEngineBackpressure: a client that sends far more requests than the
// connection admits before reading any reply gets them all answered.
func TestEngineBackpressure(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(8, 8<<20)
	e := NewEngine(NewMemoryBackendFrom(bytes.Clone(data)), EngineOptions{MaxRequest: 1 << 20})
	defer e.Close()
	srv, cli := engTestSocketPair(t)
	res := make(chan error, 1)
	go func() { res <- e.ServeConn(context.Background(), srv) }()
	const n = 2000
	const length = 64 << 10
	sendDone := make(chan error, 1)
	go func() {
		var b [wireRequestSize]byte
		for i := range n {
			putRequest(b[:], protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
				Type: wireCmdRead, Handle: uint64(i), Offset: uint64(i%128) * length, Length: length})
			if _, err := cli.Write(b[:]); err != nil {
				sendDone <- err
				return
			}
		}
		sendDone <- nil
	}()
	time.Sleep(100 * time.Millisecond) // let the engine hit its limits
	seen := make([]bool, n)
	buf := make([]byte, length)
	for range n {
		var hb [wireReplySize]byte
		if _, err := io.ReadFull(cli, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, err := parseReply(hb[:])
		if err != nil || h.Error != 0 || h.Handle >= n || seen[h.Handle] {
			t.Fatalf("bad reply %+v: %v", h, err)
		}
		seen[h.Handle] = true
		if _, err := io.ReadFull(cli, buf); err != nil {
			t.Fatal(err)
		}
		off := int(h.Handle%128) * length
		if !bytes.Equal(buf, data[off:off+length]) {
			t.Fatalf("reply %d: wrong data", h.Handle)
		}
	}
	if err := <-sendDone; err != nil {
		t.Fatal(err)
	}
	cli.Close()
	engTestResult(t, res)
}

func TestEngineFlags(t *testing.T) {
	e := NewEngine(NewMemoryBackend(4096), EngineOptions{})
	want := "HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN"
	if got := FormatFlags(e.Flags()); got != want {
		t.Errorf("writable flags %s, want %s", got, want)
	}
	if e.Flags() != 0x16d {
		t.Errorf("writable flags %#x, want 0x16d", e.Flags())
	}
	if e.Size() != 4096 || e.ReadOnly() {
		t.Error("Size/ReadOnly passthrough")
	}
	if got := FormatFlags(0x8013); got != "HAS_FLAGS|READ_ONLY|ROTATIONAL|0x8000" {
		t.Errorf("FormatFlags: %s", got)
	}
}

func TestErrnoFor(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{nil, 0},
		{ErrReadOnly, wireEPERM},
		{syscall.EROFS, wireEPERM},
		{fmt.Errorf("x: %w", syscall.ENOSPC), wireENOSPC},
		{syscall.EFBIG, wireENOSPC},
		{io.ErrUnexpectedEOF, wireEIO},
		{context.DeadlineExceeded, wireEIO},
		{errors.New("read deadline exceeded"), wireEIO},
	} {
		if got := errnoFor(tc.err); got != tc.want {
			t.Errorf("errnoFor(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

// engTestGateFirst blocks only the reads at offset 0.
type engTestGateFirst struct {
	*MemoryBackend
	gate chan struct{}
}

func (g *engTestGateFirst) ReadAt(p []byte, off int64) (int, error) {
	if off == 0 {
		<-g.gate
	}
	return g.MemoryBackend.ReadAt(p, off)
}

// TestEngineInlineHandsOff: a request alone in flight runs inline in the
// reader; when it is slow, another goroutine takes over reading, so the
// requests sent after it are answered while it still waits, and the slow
// one is answered when it completes.
func TestEngineInlineHandsOff(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(8, 1<<20)
	g := &engTestGateFirst{MemoryBackend: NewMemoryBackendFrom(bytes.Clone(data)), gate: make(chan struct{})}
	e := NewEngine(g, EngineOptions{})
	defer e.Close()
	c, res := engTestServe(t, context.Background(), e)
	// QD1 requests: all inline
	for i := range 50 {
		r := c.do(wireCmdRead, 0, uint64(i+1)*4096, 4096, nil)
		if r.errno != 0 || !bytes.Equal(r.data, data[(i+1)*4096:(i+2)*4096]) {
			t.Fatalf("QD1 read %d: %s", i, errnoName(r.errno))
		}
	}
	_, slow := c.send(wireCmdRead, 0, 0, 4096, nil)
	time.Sleep(20 * time.Millisecond) // the slow read is running inline by now
	for i := range 5 {
		r := c.do(wireCmdRead, 0, uint64(i+1)*8192, 4096, nil)
		if r.errno != 0 || !bytes.Equal(r.data, data[(i+1)*8192:(i+1)*8192+4096]) {
			t.Fatalf("read behind the slow one: %s", errnoName(r.errno))
		}
	}
	select {
	case <-slow:
		t.Fatal("the gated read was answered before its gate opened")
	default:
	}
	close(g.gate)
	if r := c.wait(slow); r.errno != 0 || !bytes.Equal(r.data, data[:4096]) {
		t.Fatalf("slow read: %s", errnoName(r.errno))
	}
	c.disc()
	if err := engTestResult(t, res); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("ServeConn: %v", err)
	}
}
