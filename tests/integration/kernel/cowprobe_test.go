package kernel

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

// Manual diagnostics of the copy-on-write data path's speed, not part of
// any suite (suites.sh selects none of them; the bridge suite skips
// ^TestCowtest). They log deterministic counts (requests by type from the
// engine and /sys/block/nbdX/stat, uploads) next to the times, because
// times under emulation on a shared machine are noise. Run with
//
//	tests/integration/vm/vmtest.sh -run '^TestCowtestProbe' -env DNBD3GO_COW_PROBE=1 \
//	    -disk-snapshot out/vm-cowdisk.img
//
// DNBD3GO_COW_PROBE_L2 scales the cowtest layout (default 167772160, 1/8
// of the reference's; 1342177280 is the full size).

func requireProbe(t *testing.T) {
	t.Helper()
	if os.Getenv("DNBD3GO_COW_PROBE") != "1" {
		t.Skip("SKIP: a manual measurement; set DNBD3GO_COW_PROBE=1 to run it")
	}
	requireNBD(t)
}

// probeLoad is the guest's /proc/loadavg.
func probeLoad() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.TrimSpace(string(b))
}

// probeStatus logs the device's block-layer counters and the daemon's
// engine and COW counters.
func probeStatus(t *testing.T, what, dev string) {
	t.Helper()
	b, _ := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/stat")
	st := statusJSON(t, dev)
	e, _ := json.Marshal(st["engine"])
	c, _ := json.Marshal(st["cow"])
	t.Logf("STATS %s: /sys/block stat [%s]\n engine %s\n cow %s", what, strings.Join(strings.Fields(string(b)), " "), e, c)
}

// TestCowtestProbeSequence runs a scaled cowtest -t (attached as the CI
// sequence attaches: merger, --upload-delay 0) and, after a reload, -v,
// logging every phase's duration and counters.
func TestCowtestProbeSequence(t *testing.T) {
	requireProbe(t)
	l2 := os.Getenv("DNBD3GO_COW_PROBE_L2")
	if l2 == "" {
		l2 = "167772160"
	}
	disk := cowDisk(t)
	addr, mg, sess := cowServerAndMerger(t, disk, "session-probe")

	p, dev, _ := attachCmd(t, "-h", addr, "-i", "test", "-c", sess, "-C", mg.addr, "--upload-delay", "0", "--cow-stats-file", "--block-size", "4096")
	probeStatus(t, "-t before", dev)
	start := time.Now()
	cowtest(t, "-t", dev, "--l2-capacity", l2)
	t.Logf("PHASE -t: %v (guest load %s)", time.Since(start).Round(time.Second), probeLoad())
	probeStatus(t, "-t after", dev)
	p.cmd.Process.Signal(syscall.SIGTERM)
	start = time.Now()
	if c := p.wait(10 * time.Minute); c != 0 {
		t.Fatalf("attach exited %d:\n%s", c, p.output())
	}
	t.Logf("PHASE detach and final upload: %v", time.Since(start).Round(time.Second))

	p, dev, _ = attachCmd(t, "-h", addr, "-i", "test", "-L", sess, "-C", mg.addr, "--cow-stats-file", "--block-size", "4096")
	start = time.Now()
	cowtest(t, "-v", dev, "--l2-capacity", l2)
	t.Logf("PHASE -v: %v (guest load %s)", time.Since(start).Round(time.Second), probeLoad())
	probeStatus(t, "-v after", dev)
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(10 * time.Minute)
}

// probeQD1 runs n chunks of writeLongNonAlignedPattern's device requests
// (O_DIRECT, one at a time: read the tail block, write 44 KiB) from off
// and logs the mean latency per request type.
func probeQD1(t *testing.T, name, dev string, off int64, n int) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rbuf, wbuf := testutil.AlignedBuf(t, 4096), testutil.AlignedBuf(t, 45056)
	var tr, tw time.Duration
	start := time.Now()
	for range n {
		a := off / 4096 * 4096
		t0 := time.Now()
		if _, err := f.ReadAt(rbuf, a+40960); err != nil {
			t.Fatalf("%s: read: %v", name, err)
		}
		t1 := time.Now()
		if _, err := f.WriteAt(wbuf, a); err != nil {
			t.Fatalf("%s: write: %v", name, err)
		}
		tr += t1.Sub(t0)
		tw += time.Since(t1)
		off += 40960
	}
	t.Logf("QD1 %s: %d chunks in %v: read %v, write %v per request (guest load %s)", name, n,
		time.Since(start).Round(time.Millisecond), (tr / time.Duration(n)).Round(time.Microsecond),
		(tw / time.Duration(n)).Round(time.Microsecond), probeLoad())
}

// TestCowtestProbeQD1 compares the per-request latency of a COW device
// with the floor: the same kernel path answered by the tests' minimal
// in-memory server.
func TestCowtestProbeQD1(t *testing.T) {
	requireProbe(t)
	srv := newMemServer(64 << 20)
	a := attach(t, srv, nbdbridge.ConnectOptions{BlockSize: 4096})
	disk := cowDisk(t)
	_, addr := server(t, disk+"/images")
	sess := disk + "/session-qd1"
	os.RemoveAll(sess)
	os.MkdirAll(sess, 0o755)
	p, dev, _ := attachCmd(t, "-h", addr, "-i", "test", "-c", sess, "--block-size", "4096")
	if out, code := nbd(t, "resize", dev, "6576668672"); code != 0 {
		t.Fatalf("resize: %s", out)
	}
	for i := range 3 {
		probeQD1(t, "floor (memServer)", nbdbridge.DevicePath(a.idx), 4095+int64(i)*(16<<20), 300)
		probeQD1(t, "COW device", dev, 4026531839+int64(i)*(16<<20), 300)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(time.Minute)
}
