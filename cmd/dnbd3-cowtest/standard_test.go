package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestLayoutRealConstants(t *testing.T) {
	lo, err := newLayout(defaultL2Capacity)
	if err != nil {
		t.Fatal(err)
	}
	// The values of spec/cowtest.md §1 and §3.
	for _, c := range []struct {
		name      string
		got, want int64
	}{
		{"l2Capacity", lo.l2, 1342177280},
		{"testFileSize", lo.testFileSize, 3892314112},
		{"shrunk", lo.shrunk, 3503082700},
		{"grown", lo.grown, 6576668672},
		{"writeOverL2", lo.overL2Offset, 2684350464},
		{"5c read offset", lo.shrunk - pageSize, 3503078604},
		{"5d read offset", lo.testFileSize + lo.l2, 5234491392},
		{"verifyFileSizeChanges zeros", lo.zeroFrom, 3503083520},
		{"long start", lo.longStart, 4026531839},
		{"long end", lo.longEnd, 5368709121},
		{"writeNotOnBlockBorder", notOnBorderOffset, 43008},
		{"interleavedTest", interleavedOffset, 143360},
		{"multipleWrites offset", multipleOffset, 16384000},
		{"multipleWrites size", multipleSize, 1638400},
		{"RND_MAX_WRITE_SIZE", rndMaxWriteSize, 1310720},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if lo.testFileSize%pageSize != 0 || lo.shrunk%pageSize == 0 {
		t.Error("the original size must be aligned and the shrunk size not")
	}
	for _, l2 := range []int64{defaultL2Capacity, testL2} {
		lo, _ := newLayout(l2)
		pos := int64(0)
		for _, r := range verifyRegions(lo) {
			if r.start != pos || r.end <= r.start {
				t.Fatalf("l2 %d: region %s [%d, %d) does not follow %d", l2, r.name, r.start, r.end, pos)
			}
			pos = r.end
		}
		if pos != lo.grown {
			t.Errorf("l2 %d: regions end at %d, want %d", l2, pos, lo.grown)
		}
	}
	for _, bad := range []int64{0, 4096, testL2 + 1, 9 << 20} {
		if _, err := newLayout(bad); err == nil {
			t.Errorf("newLayout(%d) accepted", bad)
		}
	}
}

func TestGenerate(t *testing.T) {
	te := newTestEnv(4096)
	dir := t.TempDir()
	img := filepath.Join(dir, "test.r1")
	// The optional SIZE works (the reference ignores it).
	out := te.mustRun(t, 0, "-c", img, "12345")
	mustContain(t, out, "12345 bytes of 0x2a")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, filled(12345, baseData)) {
		t.Fatalf("generated %d bytes, not 12345 bytes of 0x2a", len(b))
	}
	// An existing non-empty file is kept without --force.
	out = te.mustRun(t, exitFailure, "-c", img, "1M")
	mustContain(t, out, "not empty", "--force")
	if fileSize(t, img) != 12345 {
		t.Fatal("the existing file was changed")
	}
	te.mustRun(t, 0, "-c", img, "1M", "--force")
	if got := fileSize(t, img); got != 1<<20 {
		t.Fatalf("size %d after -c 1M --force", got)
	}
	// The default size is the layout's original size.
	img2 := filepath.Join(dir, "default.r1")
	te.mustRun(t, 0, "-c", img2, scaled)
	lo, _ := newLayout(testL2)
	if got := fileSize(t, img2); got != lo.testFileSize {
		t.Fatalf("default size %d, want %d", got, lo.testFileSize)
	}
	// An empty existing file may be overwritten.
	img3 := filepath.Join(dir, "empty")
	writeFilled(t, img3, 0, 0)
	te.mustRun(t, 0, "-c", img3, "4K")
}

// stdLines checks one result line per sub-test.
func stdLines(t *testing.T, out string, results map[string]string) {
	t.Helper()
	for _, name := range []string{"testSingleBit", "writeOverTwoBlocks", "writeNotOnBlockBorder", "writeOverL2",
		"fileSizeChanges", "interleavedTest", "multipleWrites", "writeLongNonAlignedPattern"} {
		want := "OK"
		if r, ok := results[name]; ok {
			want = r
		}
		re := regexp.MustCompile(`(?m)^` + name + `\s+\[\d+, \d+\)\s+` + want + `\s+\S+$`)
		if !re.MatchString(out) {
			t.Errorf("no %q line for %s:\n%s", want, name, out)
		}
	}
}

func TestStandardAndVerifyOnFile(t *testing.T) {
	te := newTestEnv(4096)
	img := filepath.Join(t.TempDir(), "img")
	te.mustRun(t, 0, "-c", img, scaled)
	out := te.mustRun(t, 0, "-t", img, scaled)
	stdLines(t, out, nil)
	mustContain(t, out, "PASSED: 8 OK, 0 FAILED, 0 SKIPPED")
	lo, _ := newLayout(testL2)
	if got := fileSize(t, img); got != lo.grown {
		t.Fatalf("size after -t: %d, want %d", got, lo.grown)
	}
	out = te.mustRun(t, 0, "-v", img, scaled)
	mustContain(t, out, "PASSED: 16 OK, 0 FAILED, 0 SKIPPED")

	// A standard test on an image that is not 0x2A fails at the first
	// sub-test and runs nothing else.
	out = te.mustRun(t, exitFailure, "-t", img, scaled)
	mustContain(t, out, "testSingleBit", "FAILED", "original data of block 0: offset 0: expected 0x2a, got 0x01", "7 not run")
}

func TestVerifyDetectsEachRegion(t *testing.T) {
	te := newTestEnv(4096)
	img := filepath.Join(t.TempDir(), "img")
	te.mustRun(t, 0, "-c", img, scaled)
	te.mustRun(t, 0, "-t", img, scaled)
	lo, _ := newLayout(testL2)
	cases := []struct {
		region string
		off    int64
	}{
		{"testSingleBit", 0},
		{"testSingleBit", singleBitByteOff},
		{"testSingleBit", 5},
		{"original data (0x2A)", 8192},
		{"writeOverTwoBlocks", twoBlocksOffset + 8191},
		{"original data (0x2A)", 20480 + 7}, // block 5: the reference skips it
		{"writeNotOnBlockBorder", notOnBorderOffset},
		{"interleavedTest", interleavedOffset + 4096},   // a gap (0x2A)
		{"interleavedTest", interleavedOffset + 5*4096}, // 15
		{"multipleWrites", multipleEnd - 1},
		{"original data (0x2A)", multipleEnd},
		{"writeOverL2", lo.overL2Offset + 4096},
		{"fileSizeChanges", lo.shrunk - 1},   // the straddling block's head
		{"fileSizeChanges", lo.shrunk},       // zero after the shrink point
		{"fileSizeChanges", lo.testFileSize}, // where 0x01 was written and cut
		{"writeLongNonAlignedPattern", lo.longStart + 40960},
		{"writeLongNonAlignedPattern", lo.longEnd - 1},
		{"grown space (zeros)", lo.grown - 1},
	}
	for _, c := range cases {
		old := patchByte(t, img, c.off, 0xEE)
		out := te.mustRun(t, exitFailure, "-v", img, scaled)
		want := fmt.Sprintf("%s: data: offset %d: expected 0x%02x, got 0xee", c.region, c.off, old)
		mustContain(t, out, want, "1 FAILED")
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(c.region) + `\s+\[\d+, \d+\)\s+FAILED`).MatchString(out) {
			t.Errorf("no FAILED line for %s", c.region)
		}
		patchByte(t, img, c.off, old)
	}
	te.mustRun(t, 0, "-v", img, scaled)

	// Wrong size.
	if err := os.Truncate(img, lo.grown-1); err != nil {
		t.Fatal(err)
	}
	out := te.mustRun(t, exitFailure, "-v", img, scaled)
	mustContain(t, out, fmt.Sprintf("size is %d bytes, want %d", lo.grown-1, lo.grown))
}

// TestStandardRealConstants runs -t with the real offsets (3.9 GB growing
// to 6.6 GB) on a sparse file that has 0x2A only where -t expects the
// original data.
func TestStandardRealConstants(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 1.3 GB")
	}
	lo, _ := newLayout(defaultL2Capacity)
	img := filepath.Join(t.TempDir(), "sparse")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(lo.testFileSize); err != nil {
		t.Fatal(err)
	}
	for _, r := range []span{
		{0, 2 * pageSize},
		{twoBlocksOffset, twoBlocksOffset + smallTestSize},
		{notOnBorderOffset, notOnBorderOffset + smallTestSize},
		{lo.overL2Offset, lo.overL2Offset + smallTestSize},
		{lo.shrunk - pageSize, lo.shrunk},
		{interleavedOffset, interleavedEnd},
	} {
		if _, err := f.WriteAt(filled(r.to-r.from, baseData), r.from); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	te := newTestEnv(4096)
	out := te.mustRun(t, 0, "-t", img)
	stdLines(t, out, nil)
	mustContain(t, out, "[2684350464, 2684358656)", "[4026531839, 5368709121)")
	if got := fileSize(t, img); got != 6576668672 {
		t.Fatalf("size %d, want 6576668672", got)
	}
}

func TestStandardAndVerifyOnDevice(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			te := newTestEnv(bs)
			nbd := resizeScript(t)
			dev := filepath.Join(t.TempDir(), "nbd0.dev")
			lo, _ := newLayout(testL2)
			writeFilled(t, dev, lo.testFileSize, baseData)
			out := te.mustRun(t, 0, "-t", dev, scaled, "--nbd-cmd", nbd)
			stdLines(t, out, nil)
			mustContain(t, out, fmt.Sprintf("block device, logical block size %d", bs), "PASSED: 8 OK, 0 FAILED, 0 SKIPPED")
			if got := fileSize(t, dev); got != lo.grown {
				t.Fatalf("session size %d, want %d", got, lo.grown)
			}
			out = te.mustRun(t, 0, "-v", dev, scaled, "--nbd-cmd", nbd)
			mustContain(t, out, "PASSED: 16 OK")
			// The device only ever saw aligned requests (the fake
			// refuses others); unaligned writes became read-modify-write.
			var rmw bool
			for _, d := range te.devs {
				for _, op := range d.ops {
					rmw = rmw || strings.HasPrefix(op, fmt.Sprintf("read %d+%d", roundDown(singleBitByteOff, bs), bs))
				}
			}
			if !rmw {
				t.Error("the 1-byte write at 6144 did not read its block first")
			}
		})
	}
}

// A device that cannot be resized: the resize steps are skipped, the rest
// runs, and the result is 0.
func TestSkipWhenDeviceCannotResize(t *testing.T) {
	te := newTestEnv(4096)
	dir := t.TempDir()
	dev := filepath.Join(dir, "nbd0.dev")
	lo, _ := newLayout(testL2)
	writeFilled(t, dev, lo.testFileSize, baseData)
	out := te.mustRun(t, 0, "-t", dev, scaled, "--nbd-cmd", "false")
	stdLines(t, out, map[string]string{"fileSizeChanges": "SKIP", "writeLongNonAlignedPattern": "SKIP"})
	mustContain(t, out,
		"SKIP: fileSizeChanges: cannot resize "+dev+": false resize "+dev+" "+fmt.Sprint(lo.shrunk)+": exit status 1",
		"SKIP: writeLongNonAlignedPattern: cannot resize "+dev,
		"PASSED: 6 OK, 0 FAILED, 2 SKIPPED")
	if got := fileSize(t, dev); got != lo.testFileSize {
		t.Fatalf("the device changed size: %d", got)
	}

	// -v: the size check and the regions that need a resize are skipped.
	out = te.mustRun(t, 0, "-v", dev, scaled, "--nbd-cmd", "false")
	mustContain(t, out, "SKIP: size: cannot resize "+dev+": false resize "+dev+": exit status 1",
		"SKIP: fileSizeChanges: cannot resize", "SKIP: writeLongNonAlignedPattern: cannot resize", "SKIP: grown space (zeros): cannot resize",
		"PASSED: 12 OK, 0 FAILED, 4 SKIPPED")
	// A missing command is reported the same way.
	out = te.mustRun(t, 0, "-v", dev, scaled, "--nbd-cmd", filepath.Join(dir, "no-such-dnbd3-nbd"))
	mustContain(t, out, "SKIP: size: cannot resize", "no such file or directory")
	// But a wrong byte is still a failure.
	patchByte(t, dev, multipleOffset, 7)
	out = te.mustRun(t, exitFailure, "-v", dev, scaled, "--nbd-cmd", "false")
	mustContain(t, out, "multipleWrites: data: offset 16384000: expected 0x03, got 0x07", "1 FAILED, 4 SKIPPED")

	// A resizable device with the wrong size fails the size check.
	out = te.mustRun(t, exitFailure, "-v", dev, scaled, "--nbd-cmd", resizeScript(t))
	mustContain(t, out, fmt.Sprintf("device size is %d bytes, want %d", lo.testFileSize, lo.grown))
}
