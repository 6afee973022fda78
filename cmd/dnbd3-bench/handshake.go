package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// handshakeOptions configure the reference-style benchmark.
type handshakeOptions struct {
	hosts     []string // dial addresses
	image     string
	rid       uint16
	runs      int
	threads   int
	blockSize int
	timeout   time.Duration // per connection (connect + handshake + read)
}

// threadResult counts one thread's runs.
type threadResult struct {
	Attempts int `json:"attempts"`
	Success  int `json:"success"`
	Fails    int `json:"fails"`
	lastErr  error
}

// handshakeResult is the outcome of runHandshakes.
type handshakeResult struct {
	Threads []threadResult `json:"threads"`
	Total   threadResult   `json:"total"`
	Elapsed time.Duration  `json:"-"`
	Seconds float64        `json:"elapsed_s"`
	PerSec  float64        `json:"handshakes_per_s"`
}

// runHandshakes runs the reference benchmark: each thread does opts.runs
// runs; a run is, for every host: connect, SELECT_IMAGE, one GET_BLOCK of
// blockSize bytes at a random unaligned offset, read it, close.
func runHandshakes(ctx context.Context, o handshakeOptions) handshakeResult {
	res := handshakeResult{Threads: make([]threadResult, o.threads)}
	start := time.Now()
	var wg sync.WaitGroup
	for t := range o.threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(t)))
			buf := make([]byte, o.blockSize)
			tr := &res.Threads[t]
			for range o.runs {
				for _, h := range o.hosts {
					if ctx.Err() != nil {
						return
					}
					tr.Attempts++
					if err := oneRun(ctx, h, o, rng, buf); err != nil {
						tr.Fails++
						tr.lastErr = err
					} else {
						tr.Success++
					}
				}
			}
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	res.Seconds = res.Elapsed.Seconds()
	for _, t := range res.Threads {
		res.Total.Attempts += t.Attempts
		res.Total.Success += t.Success
		res.Total.Fails += t.Fails
		if t.lastErr != nil {
			res.Total.lastErr = t.lastErr
		}
	}
	if res.Seconds > 0 {
		res.PerSec = float64(res.Total.Success) / res.Seconds
	}
	return res
}

// oneRun does one connect-select-read-close cycle.
func oneRun(ctx context.Context, addr string, o handshakeOptions, rng *rand.Rand, buf []byte) error {
	s, err := dialSelect(ctx, addr, o.image, o.rid, o.timeout, 4096)
	if err != nil {
		return err
	}
	defer s.nc.Close()
	s.nc.SetDeadline(time.Now().Add(o.timeout))
	size := int64(s.reply.Size)
	n := int64(o.blockSize)
	if n > size {
		n = size
	}
	var off int64
	if size > n {
		off = rng.Int64N(size - n + 1) // any byte offset: deliberately unaligned
	}
	handle := rng.Uint64()
	h := protocol.Request{Cmd: protocol.CmdGetBlock, Size: uint32(n), Offset: uint64(off), Handle: handle}.Marshal()
	if _, err := s.nc.Write(h[:]); err != nil {
		return err
	}
	var rb [protocol.ReplySize]byte
	if _, err := io.ReadFull(s.br, rb[:]); err != nil {
		return err
	}
	rep, err := protocol.ParseReply(rb[:])
	if err != nil {
		return err
	}
	if rep.Cmd != protocol.CmdGetBlock || rep.Size != uint32(n) || rep.Handle != handle {
		return fmt.Errorf("unexpected reply %v to GET_BLOCK %d@%d", rep, n, off)
	}
	_, err = io.ReadFull(s.br, buf[:n])
	return err
}

// printHandshakes writes the result like the reference tool, plus timing.
func printHandshakes(w io.Writer, r handshakeResult) {
	for i, t := range r.Threads {
		fmt.Fprintf(w, "Thread #%d: Attempts: %d, Success: %d, Fails: %d\n", i, t.Attempts, t.Success, t.Fails)
	}
	fmt.Fprintf(w, "Summary: Attempts: %d, Success: %d, Fails: %d\n", r.Total.Attempts, r.Total.Success, r.Total.Fails)
	fmt.Fprintf(w, "Elapsed: %.3f s, %.1f handshakes/s\n", r.Seconds, r.PerSec)
	if r.Total.lastErr != nil {
		fmt.Fprintf(w, "Last error: %v\n", r.Total.lastErr)
	}
}
