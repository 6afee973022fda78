package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

// standardTest is the reference's standard test (-t, spec/cowtest.md §3):
// eight sub-tests on an image whose every byte is 0x2A, in order; the first
// failure stops the run. fileSizeChanges and writeLongNonAlignedPattern need
// a resizable target and are skipped on a device that cannot be resized.
type standardTest struct {
	ctx   context.Context
	t     target
	lo    layout
	delay time.Duration // -d: pause between the passes of multipleWrites
	out   io.Writer
}

// subTest is one step of the standard test.
type subTest struct {
	name string
	sp   span
	run  func() error
}

// subTests lists the sub-tests in the reference's order.
func (s *standardTest) subTests() []subTest {
	lo := s.lo
	return []subTest{
		{"testSingleBit", span{singleBitOffset, singleBitEnd}, s.testSingleBit},
		{"writeOverTwoBlocks", span{twoBlocksOffset, twoBlocksOffset + smallTestSize}, func() error { return s.overwrite8K(twoBlocksOffset) }},
		{"writeNotOnBlockBorder", span{notOnBorderOffset, notOnBorderOffset + smallTestSize}, func() error { return s.overwrite8K(notOnBorderOffset) }},
		{"writeOverL2", span{lo.overL2Offset, lo.overL2Offset + smallTestSize}, func() error { return s.overwrite8K(lo.overL2Offset) }},
		{"fileSizeChanges", span{lo.shrunk - pageSize, lo.grown}, s.fileSizeChanges},
		{"interleavedTest", span{interleavedOffset, interleavedEnd}, s.interleavedTest},
		{"multipleWrites", span{multipleOffset, multipleEnd}, s.multipleWrites},
		{"writeLongNonAlignedPattern", span{lo.longStart, lo.longEnd}, s.writeLongNonAlignedPattern},
	}
}

// run runs the sub-tests and returns the exit code.
func (s *standardTest) run() int {
	rep := newReporter(s.out)
	tests := s.subTests()
	for i, st := range tests {
		if !rep.step(st.name, st.sp, st.run) {
			rep.notRun = len(tests) - i - 1
			break
		}
	}
	return rep.finish("standard test " + s.t.Name())
}

// expect reads len(want) bytes at off and compares them with want.
func (s *standardTest) expect(what string, off int64, want []byte) error {
	got := make([]byte, len(want))
	if err := readFull(s.t, got, off); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return compareBuf(what, off, got, want)
}

// expectFill reads n bytes at off and expects every one to be v.
func (s *standardTest) expectFill(what string, off, n int64, v byte) error {
	return s.expect(what, off, filled(n, v))
}

// write writes p at off, naming the step in the error.
func (s *standardTest) write(what string, p []byte, off int64) error {
	if err := writeFull(s.t, p, off); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// testSingleBit: a 4 KiB write at 0 that changes only byte 0, then a 1-byte
// write in the middle of block 1 (a sub-block read-modify-write against the
// remote data).
func (s *standardTest) testSingleBit() error {
	if err := s.expectFill("original data of block 0", 0, pageSize, baseData); err != nil {
		return err
	}
	b := filled(pageSize, baseData)
	b[0] = 1
	if err := s.write("write block 0", b, 0); err != nil {
		return err
	}
	if err := s.expectFill("original data of block 1", pageSize, pageSize, baseData); err != nil {
		return err
	}
	if err := s.write("1-byte write", []byte{1}, singleBitByteOff); err != nil {
		return err
	}
	want := filled(singleBitEnd, baseData)
	want[0] = 1
	want[singleBitByteOff] = 1
	return s.expect("read-back", 0, want)
}

// overwrite8K: 8 KiB that must be 0x2A are overwritten with 0x01 and read
// back (writeOverTwoBlocks, writeNotOnBlockBorder, writeOverL2).
func (s *standardTest) overwrite8K(off int64) error {
	if err := s.expectFill("original data", off, smallTestSize, baseData); err != nil {
		return err
	}
	if err := s.write("write 0x01", filled(smallTestSize, 1), off); err != nil {
		return err
	}
	return s.expectFill("read-back", off, smallTestSize, 1)
}

// resize resizes the target and checks the size it then shows.
func (s *standardTest) resize(step string, n int64) error {
	if err := s.t.Resize(s.ctx, n); err != nil {
		return fmt.Errorf("%s: %w", step, err)
	}
	return s.checkSize(step, n)
}

// checkSize checks that the target shows the size a resize to n gives.
func (s *standardTest) checkSize(step string, n int64) error {
	got, err := s.t.Size()
	if err != nil {
		return fmt.Errorf("%s: %w", step, err)
	}
	if want := s.t.VisibleSize(n); got != want {
		if s.t.IsDevice() {
			return fmt.Errorf("%s: size after resize to %d is %d, want %d (rounded down to the device's logical block size %d)", step, n, got, want, s.t.BlockSize())
		}
		return fmt.Errorf("%s: size after truncate to %d is %d", step, n, got)
	}
	return nil
}

// fileSizeChanges: an unaligned shrink, growth back and beyond, writes past
// the original size that a later shrink must discard.
func (s *standardTest) fileSizeChanges() error {
	lo := s.lo
	// a, b: shrink (unaligned), grow back.
	if err := s.resize("a) shrink", lo.shrunk); err != nil {
		return err
	}
	if err := s.resize("b) grow back", lo.testFileSize); err != nil {
		return err
	}
	// c: the block that straddles the shrink point keeps its head; all
	// past the shrink point reads as zero.
	want := make([]byte, sizeChangeReadSize)
	fill(want[:pageSize], baseData)
	if err := s.expect("c) data around the shrink point", lo.shrunk-pageSize, want); err != nil {
		return err
	}
	// d: grow past the original size; the new space reads as zero.
	if err := s.resize("d) grow", lo.grown); err != nil {
		return err
	}
	if err := s.expectFill("d) grown space", lo.testFileSize+lo.l2, sizeChangeReadSize, 0); err != nil {
		return err
	}
	// e: write past the original size.
	if err := s.write("e) write past the original size", filled(sizeChangeReadSize, 1), lo.testFileSize); err != nil {
		return err
	}
	if err := s.expectFill("e) read-back", lo.testFileSize, sizeChangeReadSize, 1); err != nil {
		return err
	}
	// f: shrink below that write and grow again: the whole write is gone
	// (the reference compares only the first 8 KiB here).
	if err := s.resize("f) shrink to the original size", lo.testFileSize); err != nil {
		return err
	}
	if err := s.resize("f) grow", lo.grown); err != nil {
		return err
	}
	if err := s.expectFill("f) discarded write", lo.testFileSize, sizeChangeReadSize, 0); err != nil {
		return err
	}
	// g: verifyFileSizeChanges.
	return verifySizeChanges(s.ctx, s.t, lo)
}

// verifySizeChanges is the reference's verifyFileSizeChanges: 4 KiB of
// 0x2A before the shrink point, then zeros up to writeLongNonAlignedPattern.
// The reference reads the zeros in 8 KiB pieces; we read them in
// compareChunk pieces, which checks the same bytes with 1/160 of the
// requests (65,000 round trips through a device otherwise).
func verifySizeChanges(ctx context.Context, t target, lo layout) error {
	const what = "g) verifyFileSizeChanges"
	want := make([]byte, compareChunk)
	fill(want[:pageSize], baseData)
	got := make([]byte, compareChunk)
	if err := readFull(t, got[:verifySizeChunk], lo.shrunk-pageSize); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if err := compareBuf(what, lo.shrunk-pageSize, got[:verifySizeChunk], want[:verifySizeChunk]); err != nil {
		return err
	}
	clear(want)
	for off := lo.zeroFrom; off < lo.longStart; off += compareChunk {
		if err := interrupted(ctx); err != nil {
			return err
		}
		n := min(compareChunk, lo.longStart-off)
		if err := readFull(t, got[:n], off); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if err := compareBuf(what+" (zeros)", off, got[:n], want[:n]); err != nil {
			return err
		}
	}
	return nil
}

// interleavedPattern is the expected content of the ten blocks of
// interleavedTest: written blocks and gaps that keep the remote data.
var interleavedPattern = [10]byte{10, 42, 12, 42, 14, 15, 42, 42, 18, 42}

// interleavedTest: writes with gaps; the gaps must keep the remote data.
func (s *standardTest) interleavedTest() error {
	off := int64(interleavedOffset)
	if err := s.expectFill("original data", off, interleavedSize, baseData); err != nil {
		return err
	}
	writes := []struct {
		block int64
		data  []byte
	}{
		{0, filled(pageSize, 10)},
		{2, filled(pageSize, 12)},
		{4, append(filled(pageSize, 14), filled(pageSize, 15)...)},
		{8, filled(pageSize, 18)},
	}
	for _, w := range writes {
		if err := s.write(fmt.Sprintf("write block +%d", w.block), w.data, off+w.block*pageSize); err != nil {
			return err
		}
	}
	want := make([]byte, interleavedSize)
	fillInterleaved(want, off)
	return s.expect("read-back", off, want)
}

// fillInterleaved writes the expected interleavedTest content for the
// bytes at [off, off+len(b)) into b (off ≥ interleavedOffset).
func fillInterleaved(b []byte, off int64) {
	for i := 0; i < len(b); {
		rel := off + int64(i) - interleavedOffset
		blk := rel / pageSize
		n := min(int64(len(b)-i), (blk+1)*pageSize-rel)
		fill(b[i:i+int(n)], interleavedPattern[blk])
		i += int(n)
	}
}

// multipleWrites: three passes of 1, 2, 3 over the same 1.6 MB that span
// two clusters, each read back, with -d seconds between the passes so the
// clusters can be uploaded between rewrites.
func (s *standardTest) multipleWrites() error {
	for pass, v := range []byte{1, 2, 3} {
		if pass > 0 && s.delay > 0 {
			fmt.Fprintf(s.out, "    multipleWrites: waiting %v before pass %d\n", s.delay, pass+1)
			if err := sleepCtx(s.ctx, s.delay); err != nil {
				return err
			}
		}
		what := fmt.Sprintf("pass %d", pass+1)
		if err := s.write(what, filled(multipleSize, v), multipleOffset); err != nil {
			return err
		}
		if err := s.expectFill(what+" read-back", multipleOffset, multipleSize, v); err != nil {
			return err
		}
	}
	return nil
}

// longPattern returns writeLongNonAlignedPattern's buffer: b[i] = i % 255.
func longPattern() []byte {
	b := make([]byte, longPatternChunk)
	for i := range b {
		b[i] = byte(i % 255)
	}
	return b
}

// writeLongNonAlignedPattern: the same 40 KiB buffer written over and over
// from 3·l2 − 1 to 4·l2 + 1 (unaligned, across three L2 tables, all beyond
// the original size), then read back. The reference reads back with the
// same 40 KiB chunking; we read compareChunk pieces (32 pattern periods),
// which checks the same bytes with 1/32 of the requests.
func (s *standardTest) writeLongNonAlignedPattern() error {
	lo := s.lo
	if err := s.t.CheckResize(s.ctx); err != nil {
		return fmt.Errorf("needs the size grown by fileSizeChanges: %w", err)
	}
	buf := longPattern()
	for off, i := lo.longStart, 0; off < lo.longEnd; off, i = off+longPatternChunk, i+1 {
		if i%1024 == 0 {
			if err := interrupted(s.ctx); err != nil {
				return err
			}
		}
		n := min(longPatternChunk, lo.longEnd-off)
		if err := s.write("write", buf[:n], off); err != nil {
			return err
		}
	}
	got := make([]byte, compareChunk)
	want := make([]byte, compareChunk)
	for off := lo.longStart; off < lo.longEnd; off += compareChunk {
		if err := interrupted(s.ctx); err != nil {
			return err
		}
		n := min(compareChunk, lo.longEnd-off)
		if err := readFull(s.t, got[:n], off); err != nil {
			return fmt.Errorf("read-back: %w", err)
		}
		fillLongPattern(want[:n], buf, off-lo.longStart)
		if err := compareBuf("read-back", off, got[:n], want[:n]); err != nil {
			return err
		}
	}
	return nil
}

// fillLongPattern writes into b the bytes of writeLongNonAlignedPattern at
// rel bytes from its start: the 40 KiB buffer long, repeated.
func fillLongPattern(b, long []byte, rel int64) {
	for i := 0; i < len(b); {
		i += copy(b[i:], long[(rel+int64(i))%longPatternChunk:])
	}
}
