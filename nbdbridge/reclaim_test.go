package nbdbridge

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pfIOFlusher are the PF_* bits PR_SET_IO_FLUSHER sets (PF_MEMALLOC_NOIO |
// PF_LOCAL_THROTTLE) as Linux 5.6 to 6.x number them: the tests check the
// threads with them, independently of the code under test.
const pfIOFlusher = 0x00080000 | 0x00100000

// reclaimResult is what the helper process reports.
type reclaimResult struct {
	PID              int
	ReexecErr        string
	Flagged, Threads int
	IOFlusherErr     string
	MemoryLockErr    string
	OOMScoreAdjErr   string
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// TestReclaimHelper is the helper process of the tests below; it does
// nothing unless started by runReclaimHelper.
func TestReclaimHelper(t *testing.T) {
	mode := os.Getenv("NBDBRIDGE_RECLAIM_HELPER")
	if mode == "" {
		t.Skip("helper process for TestProtectDaemon* (runs only when they start it)")
	}
	var res reclaimResult
	if mode == "reexec" {
		res.ReexecErr = errString(ReexecAsIOFlusher())
	}
	res.PID = os.Getpid()
	// More threads: each locked goroutine keeps its own.
	stop := make(chan struct{})
	ready := make(chan struct{})
	for range 6 {
		go func() {
			runtime.LockOSThread()
			ready <- struct{}{}
			<-stop
		}()
	}
	for range 6 {
		<-ready
	}
	oom, _ := strconv.Atoi(os.Getenv("NBDBRIDGE_RECLAIM_OOM"))
	p := ProtectDaemon(slog.New(slog.DiscardHandler), oom)
	res.Flagged, res.Threads = p.IOFlusherThreads, p.Threads
	res.IOFlusherErr, res.MemoryLockErr, res.OOMScoreAdjErr = errString(p.IOFlusherErr), errString(p.MemoryLockErr), errString(p.OOMScoreAdjErr)
	b, _ := json.Marshal(res)
	fmt.Printf("\nRESULT %s\n", b)
	io.Copy(io.Discard, os.Stdin) // the parent inspects us until it closes stdin
	close(stop)
}

// helperProc is a running helper, held until the test ends.
type helperProc struct {
	pid int
	res reclaimResult
}

// runReclaimHelper starts the helper process (mode "reexec": it calls
// ReexecAsIOFlusher first; "plain": it does not) and returns once it
// reported; it stays alive for inspection until the test ends.
func runReclaimHelper(t *testing.T, mode string, oomScoreAdj int) helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestReclaimHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), "NBDBRIDGE_RECLAIM_HELPER="+mode, "NBDBRIDGE_RECLAIM_OOM="+strconv.Itoa(oomScoreAdj))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if s, ok := strings.CutPrefix(sc.Text(), "RESULT "); ok {
				lines <- s
			}
		}
		close(lines)
	}()
	var line string
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatal("helper exited without a result")
		}
		line = l
	case <-time.After(60 * time.Second):
		t.Fatal("helper reported nothing within 60 s")
	}
	h := helperProc{pid: cmd.Process.Pid}
	if err := json.Unmarshal([]byte(line), &h.res); err != nil {
		t.Fatalf("helper result %q: %v", line, err)
	}
	return h
}

// threadFlags counts the threads of pid and those carrying pfIOFlusher.
func threadFlags(t *testing.T, pid int) (flagged, total int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		f, err := taskFlags(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			t.Fatal(err)
		}
		total++
		if f&pfIOFlusher == pfIOFlusher {
			flagged++
		}
	}
	return flagged, total
}

func procStatusKB(t *testing.T, pid int, key string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", key, pid)
	return 0
}

func oomScoreAdj(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// TestProtectDaemonReexec: after ReexecAsIOFlusher, every thread of the
// process (the same pid) is an I/O flusher, checked in /proc from outside;
// memory is locked and oom_score_adj set. Without CAP_SYS_RESOURCE (the
// development host) the refusal is reported with its reason instead.
func TestProtectDaemonReexec(t *testing.T) {
	if os.Getenv("NBDBRIDGE_RECLAIM_HELPER") != "" {
		t.Skip("inside the helper")
	}
	h := runReclaimHelper(t, "reexec", DefaultOOMScoreAdj)
	flagged, total := threadFlags(t, h.pid)
	t.Logf("helper: %+v; /proc: %d of %d threads flagged, VmLck %d kB", h.res, flagged, total, procStatusKB(t, h.pid, "VmLck"))
	if h.res.PID != h.pid {
		t.Errorf("helper reports pid %d, started as %d: the re-exec must keep the process", h.res.PID, h.pid)
	}
	canLockAll := hasCapability(unix.CAP_IPC_LOCK)
	if canLockAll != (h.res.MemoryLockErr == "") || canLockAll != (procStatusKB(t, h.pid, "VmLck") > 0) {
		t.Errorf("CAP_IPC_LOCK %v, but memory lock error %q and VmLck %d kB", canLockAll, h.res.MemoryLockErr, procStatusKB(t, h.pid, "VmLck"))
	}

	t.Run("IOFlusher", func(t *testing.T) {
		if !hasCapability(unix.CAP_SYS_RESOURCE) {
			t.Skip("SKIP: needs CAP_SYS_RESOURCE to set PR_SET_IO_FLUSHER (runs in the VM: vmtest.sh -p ./nbdbridge/ -run ProtectDaemon)")
		}
		if h.res.ReexecErr != "" || h.res.IOFlusherErr != "" {
			t.Fatalf("re-exec: %q, check: %q", h.res.ReexecErr, h.res.IOFlusherErr)
		}
		if total < 7 || flagged != total {
			t.Errorf("/proc: %d of %d threads are I/O flushers, want all (at least the 6 extra and main)", flagged, total)
		}
		if h.res.Flagged != h.res.Threads || h.res.Threads < 7 {
			t.Errorf("IOFlusherThreads: %d of %d", h.res.Flagged, h.res.Threads)
		}
		if got := oomScoreAdj(t, h.pid); got != DefaultOOMScoreAdj || h.res.OOMScoreAdjErr != "" {
			t.Errorf("oom_score_adj %d (err %q), want %d", got, h.res.OOMScoreAdjErr, DefaultOOMScoreAdj)
		}
	})
	t.Run("NoCapability", func(t *testing.T) {
		if hasCapability(unix.CAP_SYS_RESOURCE) {
			t.Skip("SKIP: has CAP_SYS_RESOURCE; the refusal is checked where it is missing (the development host)")
		}
		if !strings.Contains(h.res.ReexecErr, "CAP_SYS_RESOURCE") || !strings.Contains(h.res.IOFlusherErr, "CAP_SYS_RESOURCE") {
			t.Errorf("re-exec error %q, check error %q: want both to name CAP_SYS_RESOURCE", h.res.ReexecErr, h.res.IOFlusherErr)
		}
		if flagged != 0 {
			t.Errorf("%d threads flagged without the capability", flagged)
		}
		if !strings.Contains(h.res.OOMScoreAdjErr, "CAP_SYS_RESOURCE") || oomScoreAdj(t, h.pid) == DefaultOOMScoreAdj {
			t.Errorf("oom_score_adj %d, error %q: want a refusal naming CAP_SYS_RESOURCE", oomScoreAdj(t, h.pid), h.res.OOMScoreAdjErr)
		}
	})
}

// TestProtectDaemonWithoutReexec: a process that sets the flag only after
// the runtime started its threads is caught: the check counts the threads
// that lack it. Raising oom_score_adj needs no privilege.
func TestProtectDaemonWithoutReexec(t *testing.T) {
	if os.Getenv("NBDBRIDGE_RECLAIM_HELPER") != "" {
		t.Skip("inside the helper")
	}
	h := runReclaimHelper(t, "plain", 500)
	if got := oomScoreAdj(t, h.pid); got != 500 || h.res.OOMScoreAdjErr != "" {
		t.Errorf("oom_score_adj %d (err %q), want 500", got, h.res.OOMScoreAdjErr)
	}
	if !hasCapability(unix.CAP_SYS_RESOURCE) {
		t.Skip("SKIP: needs CAP_SYS_RESOURCE to set PR_SET_IO_FLUSHER (runs in the VM: vmtest.sh -p ./nbdbridge/ -run ProtectDaemon)")
	}
	flagged, total := threadFlags(t, h.pid)
	if flagged != 0 || h.res.Flagged != 0 || h.res.Threads < 7 {
		t.Errorf("without re-exec: /proc %d of %d flagged, IOFlusherThreads %d of %d; want none", flagged, total, h.res.Flagged, h.res.Threads)
	}
	if !strings.Contains(h.res.IOFlusherErr, fmt.Sprintf("set on 0 of %d threads", h.res.Threads)) {
		t.Errorf("check error %q", h.res.IOFlusherErr)
	}
}

// TestTaskFlags parses the flags field whatever the command name holds.
func TestTaskFlags(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]uint64{
		"12 (a b) S 1 12 12 0 -1 4194560 100 0":        4194560,
		"12 (x) y) z) R 1 12 12 0 -1 64 1 2 3":         64,
		"7 ()) S 0 0 0 0 0 1077952576 0 0 0 0 0 0 0 0": 1077952576,
	} {
		p := filepath.Join(dir, "stat")
		os.WriteFile(p, []byte(content), 0o600)
		if got, err := taskFlags(p); err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", content, got, err, want)
		}
	}
	for _, bad := range []string{"", "12 (x S 1", "12 (x) S 1 2", "12 (x) S 1 12 12 0 -1 nope"} {
		p := filepath.Join(dir, "stat")
		os.WriteFile(p, []byte(bad), 0o600)
		if _, err := taskFlags(p); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
