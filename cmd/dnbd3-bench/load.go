package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// loadOptions configure the load generator.
type loadOptions struct {
	hosts       []string // dial addresses; connections are spread round-robin
	image       string
	rid         uint16
	connections int
	blockSize   int
	pattern     string // "seq" or "rand"
	queueDepth  int
	duration    time.Duration
	timeout     time.Duration // connect + handshake
}

// latencySummary holds percentiles in microseconds.
type latencySummary struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99.9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// loadResult is the outcome of runLoad.
type loadResult struct {
	Mode        string         `json:"mode"`
	Image       string         `json:"image"`
	RID         uint16         `json:"rid"`
	Connections int            `json:"connections"`
	BlockSize   int            `json:"block_size"`
	QueueDepth  int            `json:"queue_depth"`
	Pattern     string         `json:"pattern"`
	Seconds     float64        `json:"elapsed_s"`
	Bytes       uint64         `json:"bytes"`
	Ops         uint64         `json:"ops"`
	Errors      uint64         `json:"errors"`
	MBps        float64        `json:"mb_per_s"`
	IOPS        float64        `json:"iops"`
	LatencyUS   latencySummary `json:"latency_us"`
	LastError   string         `json:"last_error,omitempty"`
}

// connStats is what one connection measured.
type connStats struct {
	bytes, ops, errors uint64
	hist               *histogram
	err                error
}

// runLoad opens the connections, keeps queueDepth GET_BLOCKs in flight
// on each for the duration, and summarizes.
func runLoad(ctx context.Context, o loadOptions) (loadResult, error) {
	sessions := make([]*session, o.connections)
	var size uint64
	for k := range sessions {
		addr := o.hosts[k%len(o.hosts)]
		s, err := dialSelect(ctx, addr, o.image, o.rid, o.timeout, 256<<10)
		if err != nil {
			for _, s := range sessions[:k] {
				s.nc.Close()
			}
			return loadResult{}, fmt.Errorf("connection %d to %s: %w", k, addr, err)
		}
		if k == 0 {
			size = s.reply.Size
		} else if s.reply.Size != size {
			s.nc.Close()
			for _, s := range sessions[:k] {
				s.nc.Close()
			}
			return loadResult{}, fmt.Errorf("%s reports size %d for the image, the first server %d", addr, s.reply.Size, size)
		}
		sessions[k] = s
	}
	bs := min(uint64(o.blockSize), size)
	runCtx, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	start := time.Now()
	stats := make([]connStats, len(sessions))
	var wg sync.WaitGroup
	for k, s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lc := &loadConn{s: s, size: size, bs: bs, qd: o.queueDepth, rand: o.pattern == "rand",
				next: (size / uint64(len(sessions)) * uint64(k)) / bs * bs, seed: uint64(k)}
			stats[k] = lc.run(runCtx)
			s.nc.Close()
		}()
	}
	wg.Wait()
	el := time.Since(start)
	res := loadResult{
		Mode: "load", Image: sessions[0].reply.Name, RID: sessions[0].reply.RID,
		Connections: o.connections, BlockSize: int(bs), QueueDepth: o.queueDepth, Pattern: o.pattern,
		Seconds: el.Seconds(),
	}
	h := newHistogram()
	for _, st := range stats {
		res.Bytes += st.bytes
		res.Ops += st.ops
		res.Errors += st.errors
		h.merge(st.hist)
		if st.err != nil {
			res.LastError = st.err.Error()
		}
	}
	if res.Seconds > 0 {
		res.MBps = float64(res.Bytes) / res.Seconds / 1e6
		res.IOPS = float64(res.Ops) / res.Seconds
	}
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	res.LatencyUS = latencySummary{
		P50: us(h.percentile(50)), P90: us(h.percentile(90)), P99: us(h.percentile(99)),
		P999: us(h.percentile(99.9)), Max: us(h.max), Mean: us(h.mean()),
	}
	return res, nil
}

// loadConn drives one connection: a sender keeps qd requests in flight,
// the receiver verifies replies by handle (slot | generation << 16).
type loadConn struct {
	s    *session
	size uint64
	bs   uint64
	qd   int
	rand bool
	next uint64 // sequential offset
	seed uint64

	sentAt []atomic.Int64  // per slot: send time (unix ns)
	gen    []atomic.Uint64 // per slot: generation of the outstanding request
	free   chan int

	sent, done atomic.Uint64
	stop       chan struct{} // closed when the sender stopped
}

// discardChunk is the size of the buffer replies are read into.
const discardChunk = 256 << 10

// drainGrace bounds how long outstanding replies are awaited at the end.
const drainGrace = 5 * time.Second

func (c *loadConn) run(ctx context.Context) connStats {
	c.sentAt = make([]atomic.Int64, c.qd)
	c.gen = make([]atomic.Uint64, c.qd)
	c.free = make(chan int, c.qd)
	c.stop = make(chan struct{})
	for k := range c.qd {
		c.free <- k
	}
	sendErr := make(chan error, 1)
	go func() { sendErr <- c.sender(ctx) }()
	st := c.receiver()
	if err := <-sendErr; err != nil && st.err == nil {
		st.err = err
		st.errors++
	}
	return st
}

func (c *loadConn) sender(ctx context.Context) error {
	defer func() {
		close(c.stop)
		if c.done.Load() == c.sent.Load() {
			c.s.nc.SetReadDeadline(time.Unix(1, 0)) // nothing outstanding: wake the receiver
		} else {
			c.s.nc.SetReadDeadline(time.Now().Add(drainGrace))
		}
	}()
	rng := rand.New(rand.NewPCG(c.seed, uint64(time.Now().UnixNano())))
	blocks := c.size / c.bs
	buf := make([]byte, 0, c.qd*protocol.RequestSize)
	add := func(slot int) {
		var off uint64
		if c.rand {
			off = rng.Uint64N(blocks) * c.bs
		} else {
			if c.next+c.bs > c.size {
				c.next = 0
			}
			off = c.next
			c.next += c.bs
		}
		g := c.gen[slot].Add(1)
		c.sentAt[slot].Store(time.Now().UnixNano())
		r := protocol.Request{Cmd: protocol.CmdGetBlock, Size: uint32(c.bs), Offset: off, Handle: g<<16 | uint64(slot)}
		buf = append(buf, make([]byte, protocol.RequestSize)...)
		r.MarshalTo(buf[len(buf)-protocol.RequestSize:])
	}
	for {
		var slot int
		select {
		case <-ctx.Done():
			return nil
		case slot = <-c.free:
		}
		if ctx.Err() != nil {
			return nil
		}
		buf = buf[:0]
		add(slot)
		n := 1
	more:
		for {
			select {
			case slot = <-c.free:
				add(slot)
				n++
			default:
				break more
			}
		}
		c.sent.Add(uint64(n))
		if _, err := c.s.nc.Write(buf); err != nil {
			return fmt.Errorf("send: %w", err)
		}
	}
}

func (c *loadConn) receiver() connStats {
	st := connStats{hist: newHistogram()}
	// The payload is discarded: read it in pieces into a small buffer that
	// stays in the CPU cache, which makes the kernel's copy much cheaper.
	payload := make([]byte, min(c.bs, discardChunk))
	var rb [protocol.ReplySize]byte
	finished := func() bool {
		select {
		case <-c.stop:
			return c.done.Load() == c.sent.Load()
		default:
			return false
		}
	}
	fail := func(err error) connStats {
		st.errors++
		st.err = err
		return st
	}
	for !finished() {
		if _, err := io.ReadFull(c.s.br, rb[:]); err != nil {
			if finished() {
				break
			}
			return fail(fmt.Errorf("receive: %w", err))
		}
		rep, err := protocol.ParseReply(rb[:])
		if err != nil {
			return fail(err)
		}
		slot := int(rep.Handle & 0xffff)
		if slot >= c.qd || rep.Handle>>16 != c.gen[slot].Load() {
			return fail(fmt.Errorf("reply %v for a handle never sent", rep))
		}
		switch {
		case rep.Cmd == protocol.CmdError:
			st.errors++
			st.err = fmt.Errorf("server answered CMD_ERROR")
		case rep.Cmd != protocol.CmdGetBlock || uint64(rep.Size) != c.bs:
			return fail(fmt.Errorf("unexpected reply %v to a %d-byte GET_BLOCK", rep, c.bs))
		default:
			for left := c.bs; left > 0; {
				n := min(left, uint64(len(payload)))
				if _, err := io.ReadFull(c.s.br, payload[:n]); err != nil {
					return fail(fmt.Errorf("receive payload: %w", err))
				}
				left -= n
			}
			st.hist.record(time.Duration(time.Now().UnixNano() - c.sentAt[slot].Load()))
			st.ops++
			st.bytes += c.bs
		}
		c.done.Add(1)
		c.free <- slot
	}
	return st
}

// printLoad writes a human-readable summary.
func printLoad(w io.Writer, r loadResult) {
	fmt.Fprintf(w, "image %s rid %d: %d connection(s), %s %d-byte reads, queue depth %d\n",
		r.Image, r.RID, r.Connections, r.Pattern, r.BlockSize, r.QueueDepth)
	fmt.Fprintf(w, "%.1f MB/s, %.0f IOPS, %d ops, %d bytes in %.2f s, %d errors\n",
		r.MBps, r.IOPS, r.Ops, r.Bytes, r.Seconds, r.Errors)
	l := r.LatencyUS
	fmt.Fprintf(w, "latency µs: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n",
		l.P50, l.P90, l.P99, l.P999, l.Max, l.Mean)
	if r.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", r.LastError)
	}
}
