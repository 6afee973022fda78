package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// holeDir returns a temporary directory on tmpfs if there is one: the -w
// replay grows its files to 2 GB of holes, which tmpfs reads far faster
// than a disk file system.
func holeDir(t *testing.T) string {
	t.Helper()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "cowtest"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

func TestCompare(t *testing.T) {
	te := newTestEnv(4096)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	writeFilled(t, a, 3<<20+17, baseData)
	copyFile(t, a, b)
	out := te.mustRun(t, 0, "-x", a, b)
	mustContain(t, out, "content", "PASSED: 2 OK")

	patchByte(t, b, 2<<20+5, 0)
	out = te.mustRun(t, exitFailure, "-x", a, b)
	mustContain(t, out, fmt.Sprintf("first difference at offset %d: %s has 0x2a, %s has 0x00", 2<<20+5, a, b))
	patchByte(t, b, 2<<20+5, baseData)

	// Different sizes: the common part is still compared.
	if err := os.Truncate(b, 3<<20); err != nil {
		t.Fatal(err)
	}
	out = te.mustRun(t, exitFailure, "-x", a, b)
	mustContain(t, out, fmt.Sprintf("size difference: %s has %d bytes, %s has %d", a, 3<<20+17, b, 3<<20), "content", "1 OK, 1 FAILED")

	// A missing file is a failure, not a usage error.
	te.mustRun(t, exitFailure, "-x", a, filepath.Join(dir, "nope"))
}

// A device shows its session's size rounded down to its block size; that is
// not a size difference.
func TestCompareDeviceWithFile(t *testing.T) {
	te := newTestEnv(4096)
	nbd := resizeScript(t)
	dir := t.TempDir()
	dev, file := filepath.Join(dir, "nbd0.dev"), filepath.Join(dir, "normal")
	writeFilled(t, dev, 5<<20+100, baseData)
	writeFilled(t, file, 5<<20+100, baseData)
	out := te.mustRun(t, 0, "-x", dev, file, "--nbd-cmd", nbd)
	mustContain(t, out, fmt.Sprintf("size                               %d vs %d", 5<<20, 5<<20+100),
		"equal in units of the device block size 4096 (the last 100 bytes of "+file+" are not visible")

	// A real difference, with a resizable device: failure.
	writeFilled(t, file, 6<<20, baseData)
	out = te.mustRun(t, exitFailure, "-x", dev, file, "--nbd-cmd", nbd)
	mustContain(t, out, "size difference", "1280 vs 1536 blocks")
	// With a device that cannot be resized: skipped, contents compared.
	out = te.mustRun(t, 0, "-x", dev, file, "--nbd-cmd", "false")
	mustContain(t, out, "SKIP: size: cannot resize "+dev, "size: size difference not checked", "PASSED: 1 OK, 0 FAILED, 1 SKIPPED")
}

func TestSpecialTwoFiles(t *testing.T) {
	te := newTestEnv(4096)
	dir := holeDir(t)
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	writeFilled(t, a, 1<<20, baseData)
	copyFile(t, a, b)
	out := te.mustRun(t, 0, "-w", a, b, "--seed", "7")
	mustContain(t, out, "op  4 truncate", "op 16 write", "2062985199 vs 2062985199", "PASSED: 18 OK, 0 FAILED, 0 SKIPPED")
	if got := fileSize(t, a); got != 2062985199 {
		t.Fatalf("size after -w: %d", got)
	}
	// The replay really wrote: op 16's data is there, and data cut by the
	// truncate to 906517288 (op 3 at 959447040) is gone except where
	// rewritten.
	f, _ := os.Open(a)
	defer f.Close()
	buf := make([]byte, 20480)
	f.ReadAt(buf, 970027008)
	if strings.Count(string(buf), "\x00") > 1000 {
		t.Error("op 16's random data is missing")
	}
	f.ReadAt(buf, 960139264-20480)
	for _, c := range buf {
		if c != 0 {
			t.Fatal("data cut by a truncate came back")
		}
	}

	// Device and file: the device is grown before writes past its end.
	dev := filepath.Join(dir, "nbd0.dev")
	writeFilled(t, dev, 1<<20, baseData)
	writeFilled(t, b, 1<<20, baseData)
	out = te.mustRun(t, 0, "-w", dev, b, "--seed", "7", "--nbd-cmd", resizeScript(t))
	mustContain(t, out, "PASSED: 18 OK, 0 FAILED, 0 SKIPPED")
	if ha, hb := testutil.SHA256File(t, dev), testutil.SHA256File(t, b); ha != hb {
		t.Error("the session file differs from the plain file")
	}
}

func TestRandomFiles(t *testing.T) {
	te := newTestEnv(4096)
	dir := t.TempDir()
	m, n := filepath.Join(dir, "mounted"), filepath.Join(dir, "normal")
	writeFilled(t, m, 8<<20, baseData)
	copyFile(t, m, n)
	start := time.Now()
	out := te.mustRun(t, 0, "-r", m, n, "--duration", "2s", "-y", "50", "-z", "150")
	if d := time.Since(start); d < 2*time.Second || d > 20*time.Second {
		t.Errorf("ran %v for --duration 2s", d)
	}
	mustContain(t, out, "seed ", "stopped by duration", "replay with --seed", "PASSED: 2 OK")

	// Replay: the same seed and count give the same files.
	for _, pair := range [][2]string{{"m1", "n1"}, {"m2", "n2"}} {
		for _, p := range pair {
			writeFilled(t, filepath.Join(dir, p), 8<<20, baseData)
		}
		out := te.mustRun(t, 0, "-r", filepath.Join(dir, pair[0]), filepath.Join(dir, pair[1]), "--seed", "12345", "--ops", "400", "-z", "130")
		mustContain(t, out, "seed 12345", "stopped by operation count after 400 operations")
	}
	if testutil.SHA256File(t, filepath.Join(dir, "m1")) != testutil.SHA256File(t, filepath.Join(dir, "m2")) {
		t.Error("--seed --ops did not replay the same run")
	}

	// A pair that differs from the start fails (exit code reflects the
	// compare, unlike the reference). (With this seed no write covers the byte.)
	writeFilled(t, m, 8<<20, baseData)
	writeFilled(t, n, 8<<20, baseData)
	patchByte(t, n, 1000, 1)
	out = te.mustRun(t, exitFailure, "-r", m, n, "--seed", "1", "--ops", "3", "-y", "100")
	mustContain(t, out, "first difference at offset", "FAILED")
}

// A COW device that loses writes is caught.
func TestRandomDivergingDevice(t *testing.T) {
	te := newTestEnv(512)
	te.drop = 3
	dir := t.TempDir()
	dev, n := filepath.Join(dir, "nbd0.dev"), filepath.Join(dir, "normal")
	writeFilled(t, dev, 4<<20, baseData)
	copyFile(t, dev, n)
	out := te.mustRun(t, exitFailure, "-r", dev, n, "--seed", "3", "--ops", "20", "--nbd-cmd", resizeScript(t))
	mustContain(t, out, "first difference at offset", "random test compare: FAILED")
}

func TestRandomDevice(t *testing.T) {
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			te := newTestEnv(bs)
			dir := t.TempDir()
			dev, n := filepath.Join(dir, "nbd0.dev"), filepath.Join(dir, "normal")
			writeFilled(t, dev, 6<<20+12345, baseData)
			copyFile(t, dev, n)
			out := te.mustRun(t, 0, "-r", dev, n, "--seed", "99", "--ops", "1000", "--nbd-cmd", resizeScript(t))
			mustContain(t, out, "writes end at the current size", "PASSED")
			// The session and the normal file agree byte for byte up to
			// the visible size, and their sizes agree.
			if fileSize(t, dev) != fileSize(t, n) {
				t.Errorf("session size %d, normal %d", fileSize(t, dev), fileSize(t, n))
			}
			// Truncates happened (5 % of 1000).
			if !strings.Contains(out, "truncates") || strings.Contains(out, " 0 truncates") {
				t.Errorf("no truncates:\n%s", out)
			}

			// The same device that cannot be resized: truncates are
			// skipped visibly, the rest passes.
			out = te.mustRun(t, 0, "-r", dev, n, "--seed", "99", "--ops", "300", "--nbd-cmd", "false")
			mustContain(t, out, "SKIP: truncate: cannot resize "+dev, "SKIP: truncates: cannot resize", "PASSED: 2 OK, 0 FAILED, 1 SKIPPED")
		})
	}
}

// The drawn operations follow the reference's intended distribution, with
// its bugs fixed.
func TestRandomDraw(t *testing.T) {
	const orig = int64(6) << 30 // larger than RAND_MAX
	r := &randomTest{minPct: 50, maxPct: 150, orig: orig}
	r.rng, _ = seededGenerators(1)
	var truncs, aligned, writes, small int
	var maxOff int64
	minSize, maxSize := int64(math.MaxInt64), int64(0)
	const draws = 200000
	for range draws {
		op := r.draw(orig)
		if op.truncate {
			truncs++
			minSize, maxSize = min(minSize, op.size), max(maxSize, op.size)
			continue
		}
		writes++
		if op.n < 1 || op.n > rndMaxWriteSize || op.off < 0 || op.off >= orig {
			t.Fatalf("bad write %+v", op)
		}
		if op.aligned {
			aligned++
			if op.off%4096 != 0 || op.n%4096 != 0 {
				t.Fatalf("aligned write not aligned: %+v", op)
			}
		}
		if op.n < 4096 {
			small++
		}
		maxOff = max(maxOff, op.off)
	}
	pct := func(n int) float64 { return 100 * float64(n) / draws }
	if p := pct(truncs); p < 4.5 || p > 5.5 {
		t.Errorf("truncates %.1f%%, want 5%%", p)
	}
	if p := pct(aligned); p < 13 || p > 15 {
		t.Errorf("aligned writes %.1f%%, want 14%%", p)
	}
	if p := pct(writes - aligned); p < 80 || p > 82 {
		t.Errorf("unaligned writes %.1f%%, want 81%%", p)
	}
	if small == 0 {
		t.Error("no small writes")
	}
	// Sizes cover [50%, 150%] of the original (-z works).
	if minSize < orig/2 || maxSize > orig*3/2 || minSize > orig*52/100 || maxSize < orig*148/100 {
		t.Errorf("truncate sizes [%d, %d], want about [%d, %d]", minSize, maxSize, orig/2, orig*3/2)
	}
	// Offsets cover the whole size, not only the first 2^31 bytes.
	if maxOff < orig*99/100 {
		t.Errorf("largest offset %d of %d", maxOff, orig)
	}
}
