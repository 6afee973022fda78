package netns

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nsPrefix starts the name of every namespace the tests create; the
// process id and a per-test counter follow.
const nsPrefix = "dnbd3t-"

var (
	// skipReason is why the tests cannot run here ("" = they can).
	skipReason string
	// binDir holds dnbd3-server, dnbd3-nbd and dnbd3-merger, built by
	// TestMain.
	binDir string
	// topoSeq numbers the topologies of this run.
	topoSeq atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if skipReason = probe(); skipReason != "" {
		return m.Run()
	}
	removeLeftovers()
	dir, err := os.MkdirTemp("", "dnbd3go-netns-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "netns tests:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// go test puts GOROOT/bin first on the test binary's PATH.
	build := exec.Command("go", "build", "-o", dir+"/",
		"github.com/dnbd3go/dnbd3go/cmd/dnbd3-server",
		"github.com/dnbd3go/dnbd3go/cmd/dnbd3-nbd",
		"github.com/dnbd3go/dnbd3go/cmd/dnbd3-merger")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "netns tests: building the commands failed: %v\n%s", err, out)
		return 1
	}
	binDir = dir
	return m.Run()
}

// probe reports why network namespace tests cannot run, or "".
func probe() string {
	if os.Geteuid() != 0 {
		return "not running as root"
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " (iproute2) is not installed: apt-get install iproute2"
		}
	}
	name := fmt.Sprintf("%s%d-probe", nsPrefix, os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Sprintf("ip netns add failed: %v: %s", err, strings.TrimSpace(string(out)))
	}
	defer exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "-n", name, "link", "add", "name", "p0", "type", "veth", "peer", "name", "p1").CombinedOutput(); err != nil {
		return fmt.Sprintf("cannot create a veth pair: %v: %s", err, strings.TrimSpace(string(out)))
	}
	if out, err := exec.Command("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "p0", "root", "tbf",
		"rate", "100mbit", "burst", "256kb", "latency", "50ms").CombinedOutput(); err != nil {
		return fmt.Sprintf("tc tbf does not work (sch_tbf missing?): %v: %s", err, strings.TrimSpace(string(out)))
	}
	return ""
}

// requireNetns skips the test when namespaces are not usable.
func requireNetns(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip("SKIP: needs root and network namespaces (ip netns): " + skipReason)
	}
}

// removeLeftovers deletes the namespaces (and kills the processes in them)
// of earlier runs whose test process no longer exists.
func removeLeftovers() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		name := f[0]
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(name, nsPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() || processAlive(pid) {
			continue
		}
		fmt.Fprintf(os.Stderr, "netns tests: removing namespace %s left behind by an earlier run\n", name)
		deleteNamespace(name)
	}
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// deleteNamespace kills whatever still runs in the namespace and deletes it.
func deleteNamespace(name string) {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	for range 50 {
		if exec.Command("ip", "netns", "del", name).Run() == nil || !fileExists("/var/run/netns/"+name) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// inNetns runs f on an OS thread that is switched into the namespace, so
// that sockets f creates (listen, dial) belong to it. f must not start
// goroutines that create sockets.
func inNetns(ns string, f func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", ns, err)
	}
	ferr := f()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: it is discarded when the goroutine
		// ends, instead of running other goroutines in the wrong namespace.
		return fmt.Errorf("setns back from %s: %w", ns, err)
	}
	runtime.UnlockOSThread()
	return ferr
}
