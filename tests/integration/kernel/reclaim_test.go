package kernel

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

// pfIOFlusher are the PF_* bits PR_SET_IO_FLUSHER sets (PF_MEMALLOC_NOIO |
// PF_LOCAL_THROTTLE), as the guest's kernel (6.1) numbers them.
const pfIOFlusher = 0x00080000 | 0x00100000

// daemonThreads returns how many threads pid has and how many of them
// carry pfIOFlusher (field 9 of /proc/PID/task/TID/stat).
func daemonThreads(t *testing.T, pid int) (flagged, total int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			continue // the thread ended
		}
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		flags, err := strconv.ParseUint(fields[6], 10, 64)
		if err != nil {
			t.Fatalf("%s/%s/stat: %v", dir, task.Name(), err)
		}
		total++
		if flags&pfIOFlusher == pfIOFlusher {
			flagged++
		}
	}
	return flagged, total
}

// procValue returns a field of /proc/PID/status ("VmLck") or the content
// of /proc/PID/NAME ("oom_score_adj") as a number.
func procValue(t *testing.T, pid int, name string) int {
	t.Helper()
	if name == "oom_score_adj" {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", name, pid)
	return 0
}

// checkProtected checks from outside that the attach daemon pid is
// protected from memory-reclaim deadlocks: every thread an I/O flusher,
// memory locked, the OOM killer told to spare it.
func checkProtected(t *testing.T, p *proc) {
	t.Helper()
	pid := p.cmd.Process.Pid
	flagged, total := daemonThreads(t, pid)
	lck, rss := procValue(t, pid, "VmLck"), procValue(t, pid, "VmRSS")
	oom := procValue(t, pid, "oom_score_adj")
	t.Logf("daemon %d: %d of %d threads are I/O flushers, VmLck %d kB, VmRSS %d kB, oom_score_adj %d", pid, flagged, total, lck, rss, oom)
	if flagged != total || total < 2 {
		t.Errorf("%d of %d daemon threads carry PR_SET_IO_FLUSHER, want all", flagged, total)
	}
	if lck == 0 {
		t.Errorf("daemon memory is not locked (VmLck 0)")
	}
	if oom != -1000 {
		t.Errorf("daemon oom_score_adj %d, want -1000", oom)
	}
	if !strings.Contains(p.output(), "protected against memory-reclaim deadlocks") {
		t.Errorf("no protection logged:\n%s", p.output())
	}
}

// TestAttachProtectedFromReclaim: the attach daemon is an I/O flusher on
// every thread, has its memory locked and oom_score_adj -1000.
func TestAttachProtectedFromReclaim(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	genImage(t, filepath.Join(base, "prot.r1"), 8<<20)
	_, addr := server(t, base)
	p, _, _ := attachCmd(t, "-h", addr, "-i", "prot")
	checkProtected(t, p)
}

// memoryCgroup creates a cgroup v2 group with memory.max = limit (mounting
// cgroup2 on /sys/fs/cgroup first if needed) and returns its directory.
// Cleanup moves whatever is left in it back to the root group and removes
// it.
func memoryCgroup(t *testing.T, limit int64) string {
	t.Helper()
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(root + "/cgroup.controllers"); err != nil {
		if out, err := exec.Command("mount", "-t", "cgroup2", "none", root).CombinedOutput(); err != nil {
			t.Skipf("SKIP: cannot mount cgroup2: %v\n%s", err, out)
		}
	}
	if err := os.WriteFile(root+"/cgroup.subtree_control", []byte("+memory"), 0); err != nil {
		t.Skipf("SKIP: no memory controller: %v", err)
	}
	os.WriteFile(root+"/cgroup.subtree_control", []byte("+io"), 0) // per-cgroup writeback, where available
	cg := filepath.Join(root, fmt.Sprintf("dnbd3go-%s-%d", t.Name(), os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		procs, _ := os.ReadFile(cg + "/cgroup.procs")
		for _, pid := range strings.Fields(string(procs)) {
			os.WriteFile(root+"/cgroup.procs", []byte(pid), 0)
		}
		if err := os.Remove(cg); err != nil {
			t.Errorf("removing cgroup: %v", err)
		}
	})
	if err := os.WriteFile(cg+"/memory.max", []byte(strconv.FormatInt(limit, 10)), 0); err != nil {
		t.Fatal(err)
	}
	return cg
}

// cgroupEvents returns memory.events of cg as a map.
func cgroupEvents(t *testing.T, cg string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(cg + "/memory.events")
	if err != nil {
		t.Fatal(err)
	}
	ev := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		k, v, _ := strings.Cut(l, " ")
		ev[k], _ = strconv.Atoi(v)
	}
	return ev
}

// cowWrite is a mounted copy-on-write device and a file to copy onto it.
type cowWrite struct {
	p        *proc
	mnt, src string
	size     int
}

// setupCOWWrite attaches a fresh session in sess on a sparse image of
// twice size, makes and mounts ext4 on the device and writes size bytes
// of test data to a file on /tmp; the daemon's protection is checked.
func setupCOWWrite(t *testing.T, sess string, size int) *cowWrite {
	t.Helper()
	base := t.TempDir()
	img, err := os.Create(filepath.Join(base, "w.r1"))
	if err == nil {
		err = img.Truncate(int64(2 * size))
		img.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	_, addr := server(t, base)
	p, dev, _ := attachCmd(t, "-h", addr, "-i", "w", "-c", sess)
	checkProtected(t, p)
	mkfs(t, dev)
	w := &cowWrite{p: p, mnt: mountDev(t, dev), src: filepath.Join(t.TempDir(), "src"), size: size}

	// One random MiB, each 4 KiB block stamped with its offset.
	block := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{14}).Read(block)
	f, err := os.Create(w.src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off := 0; off < size; off += len(block) {
		for b := 0; b < len(block); b += 4096 {
			copy(block[b:], fmt.Sprintf("%016x", off+b))
		}
		if _, err := f.Write(block); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// copyIn copies the test data onto the device with dd conv=fsync (inside
// cgroup cg unless empty) and returns how long it took. A copy that does
// not finish within the bound fails the test with the daemon's kernel
// stacks; it is not waited for (a writer stuck in writeback may not even
// die of SIGKILL).
func (w *cowWrite) copyIn(t *testing.T, cg string, within time.Duration) time.Duration {
	t.Helper()
	dd := fmt.Sprintf("exec dd if=%q of=%q bs=1M conv=fsync", w.src, filepath.Join(w.mnt, "big"))
	if cg != "" {
		dd = fmt.Sprintf("echo $$ > %q && %s", cg+"/cgroup.procs", dd)
	}
	var out bytes.Buffer
	cmd := exec.Command("sh", "-c", dd)
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v\n%s", dd, err, out.String())
		}
		return time.Since(start)
	case <-time.After(within):
		cmd.Process.Kill()
		t.Fatalf("writing %d MiB onto the device did not finish within %v; the daemon's threads are in:\n%s",
			w.size>>20, within, kernelStacks(w.p.cmd.Process.Pid))
	}
	return 0
}

// verify checks the copy on the device against the source, read through
// the daemon (the page cache dropped).
func (w *cowWrite) verify(t *testing.T) {
	t.Helper()
	dropCaches()
	if err := sameContent(w.src, filepath.Join(w.mnt, "big")); err != nil {
		t.Fatal(err)
	}
	umount(t, w.mnt)
}

// kernelStacks returns the kernel stacks of pid's threads.
func kernelStacks(pid int) string {
	var b strings.Builder
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stack", pid, task.Name()))
		fmt.Fprintf(&b, "thread %s:\n%s", task.Name(), st)
	}
	return b.String()
}

// TestCOWWriteUnderMemoryPressure: the attach daemon of a mounted
// copy-on-write device and a writer share a cgroup whose memory.max holds
// the new session data plus a little: the writer's dirty pages of
// /dev/nbdX can only be freed by writing them back through the daemon,
// which needs memory itself to store them. The large write completes
// within a generous bound and reads back intact.
func TestCOWWriteUnderMemoryPressure(t *testing.T) {
	requireNBD(t)
	const size = 96 << 20
	w := setupCOWWrite(t, t.TempDir(), size)
	// The session's data file is on tmpfs: every block the daemon stores
	// is charged to the group for good. memory.max leaves 48 MiB beyond
	// it for the daemon's buffers and the device's page cache.
	const limit = size + 48<<20
	cg := memoryCgroup(t, limit)
	if err := os.WriteFile(cg+"/cgroup.procs", []byte(strconv.Itoa(w.p.cmd.Process.Pid)), 0); err != nil {
		t.Fatalf("moving the daemon into the cgroup: %v", err)
	}
	took := w.copyIn(t, cg, 150*time.Second) // about 10 s
	ev := cgroupEvents(t, cg)
	peak, _ := os.ReadFile(cg + "/memory.peak")
	t.Logf("wrote %d MiB in %v under memory.max %d MiB: memory.events %v, peak %s MiB; daemon VmRSS %d kB",
		size>>20, took.Round(time.Millisecond), limit>>20, ev, mib(peak), procValue(t, w.p.cmd.Process.Pid, "VmRSS"))
	if ev["max"] == 0 {
		t.Errorf("the group never reached memory.max: the test did not create memory pressure")
	}
	if ev["oom_kill"] != 0 {
		t.Errorf("%d processes of the group were OOM-killed", ev["oom_kill"])
	}
	w.verify(t)
}

// TestCOWWritebackDirtyLimit: the session lives on a disk-backed
// filesystem (ext4 on a second NBD device served from this test's memory)
// and the kernel's dirty limit is small (vm.dirty_bytes 4 MiB). Writing
// back /dev/nbdX makes the daemon write the session's data file, and the
// kernel throttles a writer while the system has too many dirty pages:
// mostly the device's own, which only the daemon can clean. Without
// PR_SET_IO_FLUSHER (its PF_LOCAL_THROTTLE: throttle the daemon only on
// the device it writes to) the daemon sleeps in balance_dirty_pages for
// ever and the write never finishes (the daemon before the fix: stuck for
// 90 s and more); with it, it completes.
func TestCOWWritebackDirtyLimit(t *testing.T) {
	requireNBD(t)
	const size = 64 << 20
	disk := newMemServer(2*size + 64<<20)
	a := attach(t, disk, nbdbridge.ConnectOptions{Index: -1, ServerFlags: nbdFlagHasFlags | nbdFlagSendFlush, Timeout: 2 * time.Minute})
	waitSize(t, a.idx, disk.size())
	sdev := nbdbridge.DevicePath(a.idx)
	mkfs(t, sdev)
	smnt := mountDev(t, sdev)
	t.Cleanup(func() { exec.Command("umount", "-l", smnt).Run() }) // after the daemon stopped
	w := setupCOWWrite(t, smnt, size)

	vm := func(name string) string {
		b, _ := os.ReadFile("/proc/sys/vm/" + name)
		return strings.TrimSpace(string(b))
	}
	ratio, bg := vm("dirty_ratio"), vm("dirty_background_ratio")
	t.Cleanup(func() { // first of all: it also frees a stuck daemon
		os.WriteFile("/proc/sys/vm/dirty_background_ratio", []byte(bg), 0)
		os.WriteFile("/proc/sys/vm/dirty_ratio", []byte(ratio), 0)
	})
	for name, v := range map[string]string{"dirty_bytes": "4194304", "dirty_background_bytes": "1048576"} {
		if err := os.WriteFile("/proc/sys/vm/"+name, []byte(v), 0); err != nil {
			t.Fatal(err)
		}
	}
	took := w.copyIn(t, "", 150*time.Second) // about 15 s
	t.Logf("wrote %d MiB in %v with vm.dirty_bytes 4 MiB", size>>20, took.Round(time.Millisecond))
	w.verify(t)
}

// mib renders a byte count read from a cgroup file in MiB.
func mib(b []byte) string {
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return "?"
	}
	return strconv.FormatInt(n>>20, 10)
}

// sameContent compares two files.
func sameContent(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += int64(len(ba)) {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return fmt.Errorf("%s differs from %s in the MiB at %d (%d and %d bytes read)", b, a, off, nb, na)
		}
		if ea == io.EOF || ea == io.ErrUnexpectedEOF {
			if eb != ea {
				return fmt.Errorf("%s and %s end differently: %v, %v", a, b, ea, eb)
			}
			return nil
		}
		if ea != nil || eb != nil {
			return fmt.Errorf("comparing %s and %s: %v, %v", a, b, ea, eb)
		}
	}
}
