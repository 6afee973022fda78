package cowstore

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// crashOpts are the options of the crash tests' sessions.
func crashOpts() Options {
	return Options{Remote: genRemote{crashImageSize}, ImageName: "crash", RID: 1, CommitInterval: -1}
}

// TestCrashPointChild is the child process of TestCommitCrashPoints: it
// runs the crash workload in COWSTORE_CRASHPOINT_DIR and SIGKILLs itself
// just before commit operation COWSTORE_CRASHPOINT_AT (a write to meta or
// a sync; 0: never). It prints "ACK i" when state i is acknowledged (a
// flush or shrink returned) and "OPS n", the number of operations, at the
// end.
func TestCrashPointChild(t *testing.T) {
	dir := os.Getenv("COWSTORE_CRASHPOINT_DIR")
	if dir == "" {
		t.Skip("SKIP: helper process of TestCommitCrashPoints")
	}
	at, _ := strconv.Atoi(os.Getenv("COWSTORE_CRASHPOINT_AT"))
	plan := &faultPlan{killAt: at}
	opts := crashOpts()
	opts.wrapFile = plan.wrap
	o, err := Create(dir, opts)
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	plan.arm()
	_, commits := crashStates(crashWorkload())
	for i, s := range crashWorkload() {
		if err := runStep(o, s); err != nil {
			fmt.Println("ERROR", s, err)
			os.Exit(1)
		}
		if commits[i] {
			fmt.Println("ACK", i+1)
		}
	}
	fmt.Println("OPS", plan.count())
	if at > 0 {
		syscall.Kill(syscall.Getpid(), syscall.SIGKILL) // crash after the last commit
		select {}
	}
	os.Exit(0)
}

// runCrashChild runs TestCrashPointChild killing it at operation at and
// returns the last acknowledged state and the operation count it
// printed (-1 if it was killed before).
func runCrashChild(t *testing.T, dir string, at int) (acked, ops int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashPointChild$")
	cmd.Env = append(os.Environ(), "COWSTORE_CRASHPOINT_DIR="+dir, "COWSTORE_CRASHPOINT_AT="+strconv.Itoa(at))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var ee *exec.ExitError
	killed := errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signaled() && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL
	if at > 0 && !killed || at == 0 && err != nil {
		t.Fatalf("child (kill at %d): %v\n%s%s", at, err, out, stderr.String())
	}
	acked, ops = 0, -1
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 1 && f[0] == "ERROR":
			t.Fatalf("child (kill at %d): %s", at, sc.Text())
		case len(f) == 2 && f[0] == "ACK":
			acked, _ = strconv.Atoi(f[1])
		case len(f) == 2 && f[0] == "OPS":
			ops, _ = strconv.Atoi(f[1])
		}
	}
	return acked, ops
}

// TestCommitCrashPoints kills a process that writes and flushes at every
// write and sync of every commit in turn (and once after the last one),
// then loads the session: it must load every time, show every block as
// it was at the last acknowledged flush or as the commit under way would
// have left it, and accept further writes that survive a reload.
func TestCommitCrashPoints(t *testing.T) {
	steps := crashWorkload()
	states, commits := crashStates(steps)
	blocks := checkBlocks(states)
	acked, total := runCrashChild(t, t.TempDir(), 0)
	if acked != len(states)-1 || total <= 0 {
		t.Fatalf("uninterrupted run: acked state %d of %d, %d operations", acked, len(states)-1, total)
	}
	t.Logf("%d commit operations, %d states, %d blocks checked", total, len(states), len(blocks))
	for at := 1; at <= total+1; at++ {
		dir := t.TempDir()
		acked, _ := runCrashChild(t, dir, at)
		from, to := allowedStates(commits, acked)
		o, err := Load(dir, crashOpts())
		if err != nil {
			t.Fatalf("killed before operation %d (acknowledged state %d): load: %v", at, acked, err)
		}
		if err := checkCrashed(o, states, from, to, blocks); err != nil {
			o.Close()
			t.Fatalf("killed before operation %d (acknowledged state %d): %v", at, acked, err)
		}
		checkContinue(t, dir, crashOpts(), o, blocks)
	}
}
