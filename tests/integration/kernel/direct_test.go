package kernel

import (
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// slotsOf returns the "slots" part of `dnbd3-nbd status --json`.
func slotsOf(t *testing.T, dev string) map[string]any {
	t.Helper()
	s, ok := statusJSON(t, dev)["slots"].(map[string]any)
	if !ok {
		t.Fatalf("status of %s has no slots", dev)
	}
	return s
}

// pauseMeter records the longest gap between progress calls of a reader
// after a start mark.
type pauseMeter struct {
	mu    sync.Mutex
	armed bool
	last  time.Time
	worst time.Duration
}

func (p *pauseMeter) tick() {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.armed && now.Sub(p.last) > p.worst {
		p.worst = now.Sub(p.last)
	}
	p.last = now
}

func (p *pauseMeter) arm() {
	p.mu.Lock()
	p.armed = true
	p.last = time.Now()
	p.mu.Unlock()
}

// TestKernelDirectFailover: a read-only attach against dnbd3go servers
// runs on the kernel-direct path (the kernel reads from the server's TCP
// connections itself). SIGKILL of the serving server in the middle of a
// full read: the read completes with the right data and no I/O error, the
// device moves to the other server, still direct, and the longest pause
// the reader saw is reported.
func TestKernelDirectFailover(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "kd.r1"), 128<<20)
	a, addrA := server(t, base)
	b, addrB := server(t, base)
	p, dev, _ := attachCmd(t, "-h", addrA+" "+addrB, "-S", "-i", "kd", "--timeout", "60s", "--log-level", "debug")
	sl := slotsOf(t, dev)
	if sl["mode"] != "direct" || sl["direct"].(float64) < 1 {
		t.Fatalf("attach against dnbd3go servers is not kernel-direct: %v", sl)
	}
	var cur string // chosen when the read is under way (RTT probing may switch servers first)
	iot, _ := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/queue/io_timeout")
	t.Logf("request timer of %s: %s ms", dev, strings.TrimSpace(string(iot)))
	var pm pauseMeter
	var killed atomic.Bool
	var killAt time.Time
	logBefore := len(strings.Split(kernelLog(), "\n"))
	start := time.Now()
	got, err := readDevice(dev, func(n int64) {
		pm.tick()
		if n > 64<<20 && !killed.Swap(true) {
			cur = servingServer(t, dev)
			victim := map[string]*proc{addrA: a, addrB: b}[cur]
			if victim == nil {
				t.Fatalf("serving server %q is neither %s nor %s", cur, addrA, addrB)
			}
			victim.cmd.Process.Signal(syscall.SIGKILL)
			killAt = time.Now()
			pm.arm()
		}
	})
	if err != nil {
		t.Fatalf("read failed across the failover: %v", err)
	}
	if got != want {
		t.Fatal("data read across the failover differs")
	}
	after := slotsOf(t, dev)
	if after["mode"] != "direct" || after["directServer"] == cur {
		t.Fatalf("after the failover: %v (was direct on %s)", after, cur)
	}
	t.Logf("killed %s at 64 MiB; the read completed %v later on %s, still direct; longest pause seen by the reader: %v (whole read %v)",
		cur, time.Since(killAt).Round(time.Millisecond), after["directServer"], pm.worst.Round(time.Millisecond),
		time.Since(start).Round(time.Millisecond))
	// How the kernel and the daemon got there, for the log.
	klog := strings.Split(kernelLog(), "\n")
	for _, l := range grepLines(strings.Join(klog[min(logBefore-1, len(klog)):], "\n"), "nbd") {
		t.Logf("kernel: %s", l)
	}
	for _, l := range grepLines(p.output(), "dead connection", "replaced", "failed over", "connection lost", "raising") {
		t.Logf("daemon: %s", l)
	}
}

// kernelLog returns the kernel's message buffer.
func kernelLog() string {
	out, _ := exec.Command("dmesg").CombinedOutput()
	return string(out)
}

// grepLines returns the lines of text containing any of subs.
func grepLines(text string, subs ...string) []string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		for _, s := range subs {
			if strings.Contains(l, s) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// TestKernelDirectFallbackToRelay: when the only server left does not
// offer the NBD switch (a reference server; here a dnbd3go server behind a
// relay that hides the feature flag), the device falls back to the relay
// path and the read still completes without an error.
func TestKernelDirectFallbackToRelay(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "fb.r1"), 96<<20)
	a, addrA := server(t, base)
	_, addrB := server(t, base)
	plain := hideFeatures(t, addrB)
	_, dev, _ := attachCmd(t, "-h", addrA+" "+plain, "-S", "-i", "fb", "--timeout", "60s")
	if sl := slotsOf(t, dev); sl["mode"] != "direct" || sl["directServer"] != addrA {
		t.Fatalf("not direct on %s: %v", addrA, sl)
	}
	var killed atomic.Bool
	got, err := readDevice(dev, func(n int64) {
		if n > 32<<20 && !killed.Swap(true) {
			a.cmd.Process.Signal(syscall.SIGKILL)
		}
	})
	if err != nil {
		t.Fatalf("read failed across the fallback: %v", err)
	}
	if got != want {
		t.Fatal("data read across the fallback differs")
	}
	if sl := slotsOf(t, dev); sl["mode"] != "relay" {
		t.Fatalf("after losing the only direct-capable server: %v", sl)
	}
}

// TestRelayAttachFailover is TestFailoverDuringRead on the relay path
// (--kernel-direct=false): the daemon serves the kernel's socketpairs
// from the client library's asynchronous reads.
func TestRelayAttachFailover(t *testing.T) {
	requireNBD(t)
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "rl.r1"), 64<<20)
	a, addrA := server(t, base)
	b, addrB := server(t, base)
	_, dev, _ := attachCmd(t, "-h", addrA+" "+addrB, "-S", "-i", "rl", "--timeout", "60s", "--kernel-direct=false")
	if sl := slotsOf(t, dev); sl["mode"] != "relay" {
		t.Fatalf("--kernel-direct=false: %v", sl)
	}
	var cur string
	var killed atomic.Bool
	var pm pauseMeter
	got, err := readDevice(dev, func(n int64) {
		pm.tick()
		if n > 24<<20 && !killed.Swap(true) {
			cur = servingServer(t, dev)
			map[string]*proc{addrA: a, addrB: b}[cur].cmd.Process.Signal(syscall.SIGKILL)
			pm.arm()
		}
	})
	if err != nil || got != want {
		t.Fatalf("relay read across the failover: err %v, data equal %v", err, got == want)
	}
	t.Logf("relay path: killed %s at 24 MiB; longest pause seen by the reader: %v", cur, pm.worst.Round(time.Millisecond))
}

// hideFeatures starts a TCP relay to target that clears FlagFeatures in
// the client's SELECT_IMAGE, so the server behind it answers as a
// reference server would (no feature mask). It returns its address.
func hideFeatures(t *testing.T, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				var hdr [protocol.RequestSize]byte
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				req, err := protocol.ParseRequest(hdr[:])
				if err != nil || req.Size > protocol.MaxPayload {
					return
				}
				p := make([]byte, req.Size)
				if _, err := io.ReadFull(c, p); err != nil {
					return
				}
				if req.Cmd == protocol.CmdSelectImage {
					if sel, err := protocol.ParseSelectImage(p); err == nil {
						sel.Flags &^= protocol.FlagFeatures
						p = sel.Marshal()
						req.Size = uint32(len(p))
						hdr = req.Marshal()
					}
				}
				u.Write(append(hdr[:], p...))
				go func() { io.Copy(u, c); u.Close() }()
				io.Copy(c, u)
			}()
		}
	}()
	return ln.Addr().String()
}
