package main

import (
	"context"
	"fmt"
	"io"
)

// region is a byte range of the image after a standard test, with its
// expected content.
type region struct {
	name       string
	start, end int64
	// needsResize marks the regions that exist only because
	// fileSizeChanges and writeLongNonAlignedPattern resized the target.
	needsResize bool
	// fill writes the expected bytes of [off, off+len(b)) into b.
	fill func(b []byte, off int64)
}

func constant(v byte) func([]byte, int64) {
	return func(b []byte, _ int64) { fill(b, v) }
}

// verifyRegions describes the whole image after a successful standard
// test, in offset order, without gaps: the sub-tests' regions, 0x2A
// everywhere else below the original size, zeros past it. Unlike the
// reference, writeOverTwoBlocks is 8 KiB (blocks 3–4) and block 5 is
// checked as original data.
func verifyRegions(lo layout) []region {
	long := longPattern()
	rs := []region{
		{name: "testSingleBit", start: singleBitOffset, end: singleBitEnd, fill: func(b []byte, off int64) {
			fill(b, baseData)
			for _, p := range []int64{0, singleBitByteOff} {
				if p >= off && p < off+int64(len(b)) {
					b[p-off] = 1
				}
			}
		}},
		{name: "writeOverTwoBlocks", start: twoBlocksOffset, end: twoBlocksOffset + smallTestSize, fill: constant(1)},
		{name: "writeNotOnBlockBorder", start: notOnBorderOffset, end: notOnBorderOffset + smallTestSize, fill: constant(1)},
		{name: "interleavedTest", start: interleavedOffset, end: interleavedEnd, fill: fillInterleaved},
		{name: "multipleWrites", start: multipleOffset, end: multipleEnd, fill: constant(3)},
		{name: "writeOverL2", start: lo.overL2Offset, end: lo.overL2Offset + smallTestSize, fill: constant(1)},
		{name: "fileSizeChanges", start: lo.shrunk - pageSize, end: lo.longStart, needsResize: true, fill: func(b []byte, off int64) {
			// 0x2A up to the shrink point, zeros after it.
			head := min(max(lo.shrunk-off, 0), int64(len(b)))
			fill(b[:head], baseData)
			clear(b[head:])
		}},
		{name: "writeLongNonAlignedPattern", start: lo.longStart, end: lo.longEnd, needsResize: true, fill: func(b []byte, off int64) {
			fillLongPattern(b, long, off-lo.longStart)
		}},
		{name: "grown space (zeros)", start: lo.longEnd, end: lo.grown, needsResize: true, fill: constant(0)},
	}
	// Fill the gaps with the original data.
	var out []region
	pos := int64(0)
	for _, r := range rs {
		if r.start > pos {
			out = append(out, region{name: "original data (0x2A)", start: pos, end: r.start, fill: constant(baseData)})
		}
		out = append(out, r)
		pos = r.end
	}
	return out
}

// verifier is -v (spec/cowtest.md §4): the size must be the grown size and
// every byte must be what the standard test leaves behind. Unlike the
// reference it goes on after a bad region, so one run shows every damaged
// region.
type verifier struct {
	ctx context.Context
	t   target
	lo  layout
	out io.Writer
}

func (v *verifier) run() int {
	rep := newReporter(v.out)
	lo := v.lo
	var resizeErr error // set when the size-dependent checks are skipped
	rep.step("size", label(fmt.Sprintf("want %d", lo.grown)), func() error {
		got, err := v.t.Size()
		if err != nil {
			return err
		}
		want := v.t.VisibleSize(lo.grown)
		if got == want {
			return nil
		}
		if v.t.IsDevice() {
			// A device that cannot be resized never got the grown size:
			// skip the checks that depend on it instead of failing.
			if err := v.t.CheckResize(v.ctx); err != nil {
				resizeErr = err
				return err
			}
			return fmt.Errorf("device size is %d bytes, want %d", got, want)
		}
		return fmt.Errorf("size is %d bytes, want %d", got, want)
	})
	buf := make([]byte, compareChunk)
	want := make([]byte, compareChunk)
	for _, r := range verifyRegions(lo) {
		if r.needsResize && resizeErr != nil {
			rep.skipped(r.name, span{r.start, r.end}, resizeErr)
			continue
		}
		rep.step(r.name, span{r.start, r.end}, func() error { return v.region(r, buf, want) })
		if v.ctx.Err() != nil {
			break
		}
	}
	return rep.finish("verify " + v.t.Name())
}

// region reads one region in chunks and compares it with its expected
// content.
func (v *verifier) region(r region, buf, want []byte) error {
	for off := r.start; off < r.end; {
		if err := interrupted(v.ctx); err != nil {
			return err
		}
		n := min(int64(len(buf)), r.end-off)
		if err := readFull(v.t, buf[:n], off); err != nil {
			return err
		}
		r.fill(want[:n], off)
		if err := compareBuf("data", off, buf[:n], want[:n]); err != nil {
			return err
		}
		off += n
	}
	return nil
}
