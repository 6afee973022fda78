package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"time"
)

// randomTest is -r (spec/cowtest.md §5): identical random writes and
// truncates to the mounted image and a plain copy until a signal,
// --duration or --ops, then a compare whose result is the exit code.
//
// Fixed against the reference: new sizes really are in [min%, max%] of the
// original size; offsets cover the whole current size (not only the first
// RAND_MAX bytes); the write size is drawn as (rand % 1,310,720) with
// proper parentheses; the run is reproducible from --seed (decisions and
// data come from seeded generators); the compare decides the exit code.
type randomTest struct {
	ctx      context.Context // ends the random phase (first signal)
	final    context.Context // for the compare after it (second signal)
	mounted  target
	normal   target
	minPct   int
	maxPct   int
	seed     uint64
	duration time.Duration // 0: until a signal
	maxOps   int64         // 0: no limit
	progress time.Duration // interval of the progress line
	out      io.Writer

	rng  *rand.Rand
	data *rand.ChaCha8
	// order is the targets in resize order (see resizeOrder).
	order    []target
	sizes    map[target]int64 // current visible sizes
	orig     int64            // the normal copy's size at the start
	extend   bool             // both are files: writes may extend them
	truncOff error            // set when truncates are unavailable

	ops, writes, truncates, skipped int64
	written                         int64
}

// seededGenerators returns the decision generator and the data stream for
// seed.
func seededGenerators(seed uint64) (*rand.Rand, *rand.ChaCha8) {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	copy(key[8:], "dnbd3-cowtest random data")
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), rand.NewChaCha8(key)
}

func (r *randomTest) run() int {
	r.rng, r.data = seededGenerators(r.seed)
	r.order = resizeOrder(r.mounted, r.normal)
	r.extend = !r.mounted.IsDevice() && !r.normal.IsDevice()
	r.sizes = map[target]int64{}
	for _, t := range r.order {
		n, err := t.Size()
		if err != nil {
			fmt.Fprintf(r.out, "random test: %v\n", err)
			return exitFailure
		}
		r.sizes[t] = n
	}
	r.orig = r.sizes[r.normal]
	fmt.Fprintf(r.out, "random test: %s (%d bytes) and %s (%d bytes), seed %d, sizes %d%%..%d%% of %d, ",
		r.mounted.Name(), r.sizes[r.mounted], r.normal.Name(), r.orig, r.seed, r.minPct, r.maxPct, r.orig)
	switch {
	case r.maxOps > 0:
		fmt.Fprintf(r.out, "%d operations\n", r.maxOps)
	case r.duration > 0:
		fmt.Fprintf(r.out, "for %v (or until SIGINT)\n", r.duration)
	default:
		fmt.Fprintf(r.out, "until SIGINT/SIGTERM\n")
	}
	if !r.extend {
		fmt.Fprintf(r.out, "    a device does not grow by writing: writes end at the current size\n")
	}

	start := time.Now()
	nextProgress := start.Add(r.progress)
	buf := make([]byte, rndMaxWriteSize)
	stopped := "signal"
	printed := int64(-1) // ops at the last progress line
	for {
		if r.ctx.Err() != nil {
			break
		}
		if r.duration > 0 && time.Since(start) >= r.duration {
			stopped = "duration"
			break
		}
		if r.maxOps > 0 && r.ops >= r.maxOps {
			stopped = "operation count"
			break
		}
		if err := r.step(buf); err != nil {
			fmt.Fprintf(r.out, "random test: FAILED at operation %d: %v\n", r.ops, err)
			fmt.Fprintf(r.out, "random test: replay with --seed %d --ops %d -y %d -z %d\n", r.seed, r.ops+1, r.minPct, r.maxPct)
			return exitFailure
		}
		r.ops++
		if r.progress > 0 && time.Now().After(nextProgress) {
			r.printProgress(time.Since(start))
			printed = r.ops
			nextProgress = time.Now().Add(r.progress)
		}
	}
	if printed != r.ops {
		r.printProgress(time.Since(start))
	}
	fmt.Fprintf(r.out, "random test: stopped by %s after %d operations; replay with --seed %d --ops %d -y %d -z %d\n",
		stopped, r.ops, r.seed, r.ops, r.minPct, r.maxPct)

	rep := newReporter(r.out)
	if r.truncOff != nil {
		rep.skipped("truncates", noSpan, r.truncOff)
	}
	compareTargets(r.final, rep, r.mounted, r.normal)
	return rep.finish("random test compare")
}

func (r *randomTest) printProgress(d time.Duration) {
	fmt.Fprintf(r.out, "    %v: %d ops (%d writes, %d truncates, %d skipped), %d bytes written, sizes %d / %d\n",
		d.Round(time.Second), r.ops, r.writes, r.truncates, r.skipped, r.written, r.sizes[r.mounted], r.sizes[r.normal])
}

// randOp is one drawn operation: a truncate of both targets to size, or
// a write of n bytes at off.
type randOp struct {
	truncate bool
	size     int64 // truncate: the new size
	off      int64 // write: offset
	n        int   // write: length
	aligned  bool  // write: 4 KiB aligned
}

// draw draws the next operation for the current common size cur. It only
// uses r.rng, so a seed gives the same sequence of operations.
func (r *randomTest) draw(cur int64) randOp {
	p := r.rng.IntN(100)
	if p < rndTruncateProbability {
		// A size in [min%, max%] of the original size.
		lo := r.orig * int64(r.minPct) / 100
		hi := r.orig * int64(r.maxPct) / 100
		return randOp{truncate: true, size: lo + r.rng.Int64N(hi-lo+1)}
	}
	op := randOp{aligned: p > rndAlignedAbove}
	if cur > 0 {
		op.off = r.rng.Int64N(cur)
	}
	// Up to 1,310,720 bytes; the smaller half is divided further, so
	// small writes are frequent.
	op.n = r.rng.IntN(rndMaxWriteSize)
	if op.n < rndMaxWriteSize/2 {
		op.n /= 1 + r.rng.IntN(8192)
	}
	op.n = max(op.n, 1)
	if op.aligned {
		op.off = roundDown(op.off, pageSize)
		op.n = max(op.n/int(pageSize)*int(pageSize), int(pageSize))
	}
	return op
}

// step draws and does one operation on both targets.
func (r *randomTest) step(buf []byte) error {
	op := r.draw(min(r.sizes[r.mounted], r.sizes[r.normal]))
	if op.truncate {
		return r.truncate(op.size)
	}
	return r.write(buf, op)
}

// truncate resizes both targets to n, devices first.
func (r *randomTest) truncate(n int64) error {
	if r.truncOff != nil {
		r.skipped++
		return nil
	}
	for i, t := range r.order {
		// A resize that has begun completes even after the first signal.
		if err := t.Resize(r.final, n); err != nil {
			var unavailable *resizeUnavailableError
			if i == 0 && errors.As(err, &unavailable) {
				r.truncOff = unavailable
				fmt.Fprintf(r.out, "SKIP: truncate: %v (truncates are skipped for the rest of the run)\n", unavailable)
				r.skipped++
				return nil
			}
			return fmt.Errorf("truncate to %d: %w", n, err)
		}
		r.sizes[t] = t.VisibleSize(n)
	}
	r.truncates++
	return nil
}

// write writes random data to both targets. With a device, the write is
// cut at the current size (a device does not grow by writing).
func (r *randomTest) write(buf []byte, op randOp) error {
	if !r.extend {
		cur := min(r.sizes[r.mounted], r.sizes[r.normal])
		op.n = int(min(int64(op.n), cur-op.off))
		if op.n <= 0 {
			r.skipped++
			return nil
		}
	}
	b := buf[:op.n]
	r.data.Read(b)
	end := op.off + int64(op.n)
	for _, t := range []target{r.mounted, r.normal} {
		if err := writeFull(t, b, op.off); err != nil {
			return err
		}
		if r.extend {
			r.sizes[t] = max(r.sizes[t], end)
		}
	}
	r.writes++
	r.written += int64(op.n)
	return nil
}
