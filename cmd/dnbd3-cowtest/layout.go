package main

import "fmt"

// The reference test program's constants (spec/cowtest.md §1). Every offset
// of the standard test and the verifier derives from these; the byte
// patterns are the reference's.
const (
	// baseData is every byte of the original image (test.r1).
	baseData = byte(42) // 0x2A, '*'

	// defaultL2Capacity is the image range one COW L2 table covers:
	// 1024 entries · 4096 bytes · 40 blocks · 8 = 1.25 GiB.
	defaultL2Capacity int64 = 1024 * 4096 * 40 * 8

	// pageSize is the COW block size the sub-tests align against.
	pageSize int64 = 4096

	// rndMaxWriteSize is the largest random write (the reference's
	// RND_MAX_WRITE_SIZE, 4096·320, used with proper parentheses).
	rndMaxWriteSize = 4096 * 320

	// rndTruncateProbability is the percentage of random steps that
	// truncate both files.
	rndTruncateProbability = 5

	// rndAlignedAbove: a random write step r (5 ≤ r < 100) is 4 KiB aligned
	// when r > 85, so 14 % of all steps are aligned and 81 % unaligned.
	rndAlignedAbove = 85

	// compareChunk is the read size of the compare and the verifier.
	compareChunk = 1310720

	// Defaults of -y/-z (integer percent of the original size).
	defaultMinSizePercent = 90
	defaultMaxSizePercent = 110

	// minL2Capacity is the smallest l2 capacity the hidden --l2-capacity
	// accepts: the fixed-offset sub-tests (multipleWrites ends at
	// 18,022,400) must stay below writeOverL2 at 2·l2 − 4096.
	minL2Capacity int64 = 10 << 20
)

// Fixed offsets and sizes of the sub-tests that do not depend on l2Capacity.
const (
	singleBitOffset    int64 = 0
	twoBlocksOffset    int64 = 3 * 4096        // 12,288: blocks 3–4
	notOnBorderOffset  int64 = 11*4096 - 2048  // 43,008: half of 10, 11, half of 12
	interleavedOffset  int64 = 35 * 4096       // 143,360: block 35
	interleavedSize    int64 = 10 * 4096       // 40,960
	multipleOffset     int64 = 100 * 4096 * 40 // 16,384,000: middle of cluster 12
	multipleSize       int64 = 4096 * 10 * 40  // 1,638,400: spans clusters 12–13
	smallTestSize      int64 = 2 * 4096        // the 8 KiB of sub-tests 2–4
	sizeChangeReadSize int64 = 10 * 4096       // 40,960: the reads/writes of fileSizeChanges
	longPatternChunk   int64 = 10 * 4096       // 40,960: writeLongNonAlignedPattern's buffer
	verifySizeChunk    int64 = 2 * 4096        // verifyFileSizeChanges first reads 8 KiB at the shrink point
	singleBitEnd       int64 = 2 * 4096        // testSingleBit touches [0, 8192)
	singleBitByteOff   int64 = 4096 + 2048     // 6,144: the 1-byte write
	interleavedEnd           = interleavedOffset + interleavedSize
	multipleEnd              = multipleOffset + multipleSize
)

// layout holds the offsets that derive from l2Capacity. The real program
// uses defaultL2Capacity; tests (and quick runs in a VM) may scale it down
// with the hidden --l2-capacity flag, which keeps every relation between the
// regions (L2 crossings, unaligned shrink point, growth past the original
// size) intact.
type layout struct {
	l2 int64 // l2Capacity

	testFileSize int64 // l2·2.9: the original image size (3,892,314,112)
	shrunk       int64 // testFileSize·0.9, unaligned (3,503,082,700)
	grown        int64 // testFileSize + 2·l2: the final size (6,576,668,672)

	overL2Offset int64 // writeOverL2: 2·l2 − 4096
	longStart    int64 // writeLongNonAlignedPattern: 3·l2 − 1
	longEnd      int64 // 4·l2 + 1 (exclusive)
	zeroFrom     int64 // verifyFileSizeChanges' zero run starts here: shrunk rounded up to 4 KiB
}

// newLayout computes the layout for l2 and checks that the regions do not
// overlap.
func newLayout(l2 int64) (layout, error) {
	if l2 < minL2Capacity || l2%40960 != 0 {
		return layout{}, fmt.Errorf("l2 capacity %d: want a multiple of 40960 of at least %d", l2, minL2Capacity)
	}
	if l2 > 1<<50 {
		return layout{}, fmt.Errorf("l2 capacity %d is too large", l2)
	}
	tfs := l2 * 29 / 10
	lo := layout{
		l2:           l2,
		testFileSize: tfs,
		shrunk:       tfs * 9 / 10,
		grown:        tfs + 2*l2,
		overL2Offset: 2*l2 - pageSize,
		longStart:    3*l2 - 1,
		longEnd:      4*l2 + 1,
	}
	lo.zeroFrom = roundUp(lo.shrunk, pageSize)
	return lo, nil
}

// roundUp rounds n up to a multiple of m.
func roundUp(n, m int64) int64 { return (n + m - 1) / m * m }

// roundDown rounds n down to a multiple of m.
func roundDown(n, m int64) int64 { return n / m * m }
