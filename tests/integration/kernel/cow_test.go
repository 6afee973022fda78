package kernel

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/promtest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// writeTree writes files into dir and returns their checksums.
func writeTree(t *testing.T, dir string, seed uint64) map[string]string {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	sums := map[string]string{}
	for i, size := range []int{100, 5000, 1 << 20, 3<<20 + 17} {
		name := filepath.Join(fmt.Sprintf("d%d", i%2), fmt.Sprintf("file%d-%d.bin", seed, i))
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(rng.UintN(256))
		}
		os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		s := sha256.Sum256(b)
		sums[name] = hex.EncodeToString(s[:])
	}
	return sums
}

// verifyTree checks the files of dir against their checksums (by path
// below dir).
func verifyTree(t *testing.T, dir string, sums map[string]string) {
	t.Helper()
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if s := sha256.Sum256(b); hex.EncodeToString(s[:]) != want {
			t.Fatalf("%s: checksum differs", name)
		}
	}
}

// mkfs makes an ext4 filesystem on dev.
func mkfs(t *testing.T, dev string) {
	t.Helper()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
}

// mountDev mounts the ext4 filesystem on dev at /mnt/<device name>.
func mountDev(t *testing.T, dev string, opts ...string) string {
	t.Helper()
	mnt := filepath.Join("/mnt", filepath.Base(dev))
	os.MkdirAll(mnt, 0o755)
	args := append([]string{"-t", "ext4"}, opts...)
	if out, err := exec.Command("mount", append(args, dev, mnt)...).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", dev, err, out)
	}
	return mnt
}

func umount(t *testing.T, mnt string) {
	t.Helper()
	if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount %s: %v\n%s", mnt, err, out)
	}
}

// TestCOWFilesystemCycle: attach with -c, mkfs.ext4, mount, write files,
// unmount, detach (the final upload reaches the merger); attach again with
// -L: the files are intact, and the merger's data equals the device.
// While attached, --metrics-listen shows the kernel's writes and the
// uploads.
func TestCOWFilesystemCycle(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "cowbase.r1"), 96<<20)
	original, _ := os.ReadFile(filepath.Join(base, "cowbase.r1"))
	_, addr := server(t, base)
	m := mergertest.Start(t)
	sess := t.TempDir()

	p, dev, _ := attachCmd(t, "-h", addr, "-i", "cowbase", "-c", sess, "-C", m.Addr, "--cow-stats-file", "--upload-delay", "0",
		"--metrics-listen", "127.0.0.1:9310")
	if ro, _ := os.ReadFile(fmt.Sprintf("/sys/block/%s/ro", filepath.Base(dev))); strings.TrimSpace(string(ro)) != "0" {
		t.Fatalf("COW device is read-only")
	}
	mkfs(t, dev)
	mnt := mountDev(t, dev)
	sums := writeTree(t, mnt, 1)
	umount(t, mnt)
	checkAttachMetrics(t, "http://127.0.0.1:9310/metrics", dev)
	out, code := nbd(t, "detach", dev)
	if code != 0 {
		t.Fatalf("detach: %s", out)
	}
	if c := p.wait(60 * time.Second); c != 0 {
		t.Fatalf("attach exited %d after detach", c)
	}
	if !strings.Contains(p.output(), "final upload") {
		t.Errorf("no final upload logged:\n%s", p.output())
	}
	status, _ := os.ReadFile(filepath.Join(sess, "status"))
	if !strings.Contains(string(status), "state=done") || !strings.Contains(string(status), "[General]") {
		t.Errorf("status file:\n%s", status)
	}
	uuids := m.Sessions()
	if len(uuids) != 1 {
		t.Fatalf("merger sessions: %v", uuids)
	}
	ms, _ := m.Session(uuids[0])
	t.Logf("merger received %d updates for %d clusters", ms.Updates, len(ms.Clusters))

	_, dev2, _ := attachCmd(t, "-h", addr, "-i", "cowbase", "-L", sess, "-C", m.Addr)
	mnt2 := mountDev(t, dev2, "-o", "ro,noload")
	verifyTree(t, mnt2, sums)
	umount(t, mnt2)
	// The merger holds every change: original + uploaded clusters equals
	// what the device shows.
	img := mergedFromUploads(t, original, ms)
	if got := testutil.SHA256File(t, dev2); got != fmt.Sprintf("%x", sha256.Sum256(img)) {
		t.Fatal("device content differs from the original plus the uploaded clusters")
	}
}

// mergedFromUploads applies every uploaded cluster to the original image.
func mergedFromUploads(t *testing.T, original []byte, s mergertest.Session) []byte {
	t.Helper()
	img := bytes.Clone(original)
	for idx, c := range s.Clusters {
		data := c.Blocks
		for b := range 320 {
			if c.Bitfield[b/8]&(1<<(b%8)) == 0 {
				continue
			}
			off := idx*1310720 + b*4096
			copy(img[off:off+4096], data[:4096])
			data = data[4096:]
		}
	}
	return img
}

// TestCOWSyncThenKill: data that was synced survives a SIGKILL of the
// daemon; the restarted daemon takes the mounted device over, and a fresh
// attach of the session shows everything.
func TestCOWSyncThenKill(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "k.r1"), 64<<20)
	_, addr := server(t, base)
	sess := t.TempDir()
	p, dev, _ := attachCmd(t, "-h", addr, "-i", "k", "-c", sess)
	mkfs(t, dev)
	mnt := mountDev(t, dev)
	sums := writeTree(t, mnt, 2)
	syscall.Sync()
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(10 * time.Second)

	p2, dev2, _ := attachCmd(t, "-h", addr, "-i", "k", "-L", sess)
	if dev2 != dev || !strings.Contains(p2.output(), "took over") {
		t.Fatalf("restart attached %s, want a takeover of %s:\n%s", dev2, dev, p2.output())
	}
	dropCaches()
	verifyTree(t, mnt, sums)
	more := writeTree(t, mnt, 3)
	umount(t, mnt)
	p2.cmd.Process.Signal(syscall.SIGTERM)
	if c := p2.wait(30 * time.Second); c != 0 {
		t.Fatalf("attach exited %d:\n%s", c, p2.output())
	}

	_, dev3, _ := attachCmd(t, "-h", addr, "-i", "k", "-L", sess)
	mnt3 := mountDev(t, dev3, "-o", "ro,noload")
	verifyTree(t, mnt3, sums)
	verifyTree(t, mnt3, more)
	umount(t, mnt3)
}

// cowDisk mounts the prepared cowtest disk (vm/cowdisk.sh) or skips.
func cowDisk(t *testing.T) string {
	t.Helper()
	if !strings.Contains(os.Getenv("DNBD3GO_VM_DISKS"), "vda") {
		t.Skip("SKIP: needs the cowtest disk (vmtest.sh -disk-snapshot out/vm-cowdisk.img, made by vm/cowdisk.sh)")
	}
	mnt := "/mnt/cowdisk"
	if _, err := os.Stat(mnt + "/images/test.r1"); err == nil {
		return mnt
	}
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "ext4", "/dev/vda", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount /dev/vda: %v\n%s", err, out)
	}
	return mnt
}

func cowtest(t *testing.T, args ...string) string {
	t.Helper()
	start := time.Now()
	out, err := exec.Command("dnbd3-cowtest", args...).CombinedOutput()
	t.Logf("dnbd3-cowtest %s (%v):\n%s", strings.Join(args, " "), time.Since(start).Round(time.Second), out)
	if err != nil {
		t.Fatalf("dnbd3-cowtest %s: %v", strings.Join(args, " "), err)
	}
	if strings.Contains(string(out), "SKIP:") || !strings.Contains(string(out), " 0 SKIPPED") {
		t.Fatalf("dnbd3-cowtest skipped steps on a COW device")
	}
	return string(out)
}

// TestCowtestRandom runs the random test for 60 s against a plain copy of
// the image, followed by its compare (the reference CI's random test).
// It uses the prepared disk's 1.5 GiB rnd.r1 rather than the 3.89 GB
// test.r1: the writes and truncates cover the whole image either way (our
// random test is not limited to the first 2 GiB as the reference's is),
// and the compare of the smaller image takes a third of the time under
// TCG. Persistence across a reload is covered by the standard sequence.
func TestCowtestRandom(t *testing.T) {
	requireNBD(t)
	disk := cowDisk(t)
	_, addr := server(t, disk+"/images")
	sess := disk + "/session-random"
	os.MkdirAll(sess, 0o755)
	p, dev, _ := attachCmd(t, "-h", addr, "-i", "rnd", "-c", sess)
	cowtest(t, "-r", dev, disk+"/rnd-normal.img", "--duration", "60s")
	p.cmd.Process.Signal(syscall.SIGTERM)
	if c := p.wait(60 * time.Second); c != 0 {
		t.Fatalf("attach exited %d", c)
	}
}

// checkAttachMetrics scrapes an attached COW device's --metrics-listen
// after a filesystem was written and unmounted: the kernel's writes and
// flushes are counted with their latencies, and the changed clusters
// reach the merger.
func checkAttachMetrics(t *testing.T, url, dev string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var s *promtest.Scrape
	for {
		s = promtest.Get(t, url, "")
		stored, _ := s.Value("dnbd3_nbd_cow_uploads_total", "device", dev, "outcome", "stored")
		dirty, _ := s.Value("dnbd3_nbd_cow_dirty_clusters", "device", dev)
		if stored > 0 && dirty == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("uploads did not catch up: stored %v, dirty %v", stored, dirty)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// writeTree wrote 4,199,425 bytes of files; mkfs and the journal more
	if v := s.Must(t, "dnbd3_nbd_written_bytes_total", "device", dev); v < 4199425 {
		t.Errorf("written bytes %v", v)
	}
	writes := s.Must(t, "dnbd3_nbd_requests_total", "device", dev, "command", "write")
	// one request in 16 of each connection is timed, whatever its command
	if lat := s.Must(t, "dnbd3_nbd_request_duration_seconds", "device", dev, "command", "write"); writes < 1 || lat < 1 || lat > writes {
		t.Errorf("writes %v, write latency samples %v", writes, lat)
	}
	if v := s.Must(t, "dnbd3_nbd_requests_total", "device", dev, "command", "flush"); v < 1 {
		t.Errorf("flushes %v", v)
	}
	if v := s.Must(t, "dnbd3_nbd_cow_uploaded_bytes_total", "device", dev); v < 1 {
		t.Errorf("uploaded bytes %v", v)
	}
	if v := s.Must(t, "dnbd3_nbd_cow_merge_state", "device", dev, "state", "none"); v != 1 {
		t.Errorf("merge state none %v", v)
	}
}
