package kernel

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServersSwitchDuringRead drives `dnbd3-nbd servers` on a real
// /dev/nbdX while a full read runs, on the kernel-direct and the relay
// path: add a server the device did not know (-S), switch to it, remove
// the first one, add it back and switch to it again. The read completes
// with the right data and no I/O error; list and status show the servers'
// origins and the pinned server; on the direct path the kernel's
// connections follow every switch.
func TestServersSwitchDuringRead(t *testing.T) {
	requireNBD(t)
	for _, mode := range []string{"direct", "relay"} {
		t.Run(mode, func(t *testing.T) { serversSwitchDuringRead(t, mode) })
	}
}

func serversSwitchDuringRead(t *testing.T, mode string) {
	t0 := time.Now()
	defer func() { t.Logf("test body took %v (cleanup follows)", time.Since(t0).Round(time.Millisecond)) }()
	base := t.TempDir()
	want := genImage(t, filepath.Join(base, "sw.r1"), 24<<20)
	_, addrA := server(t, base)
	_, addrB := server(t, base)
	args := []string{"-h", addrA, "-S", "-i", "sw", "--timeout", "60s"}
	if mode == "relay" {
		args = append(args, "--kernel-direct=false")
	}
	_, dev, _ := attachCmd(t, args...)
	t.Logf("attached after %v", time.Since(t0).Round(time.Millisecond))
	if sl := slotsOf(t, dev); sl["mode"] != mode {
		t.Fatalf("attach: slots %v, want mode %s", sl, mode)
	}
	servers(t, dev, "add", addrB, "added: "+addrB)
	if out, _ := nbd(t, "servers", dev); len(grepLines(out, addrB)) != 1 || !strings.Contains(grepLines(out, addrB)[0], "added") {
		t.Fatalf("servers %s after add:\n%s", dev, out)
	}
	steps := []struct {
		at     int64
		action string
		host   string
		expect string
		on     string // the server reads must come from afterwards
	}{
		{3 << 20, "switch", addrB, "switched to: " + addrB, addrB},
		{6 << 20, "remove", addrA, "removed: " + addrA, addrB},
		{9 << 20, "add", addrA, "added: " + addrA, addrB},
		{12 << 20, "switch", addrA, "switched to: " + addrA, addrA},
	}
	next := 0
	got, err := readDevice(dev, func(n int64) {
		if next < len(steps) && n >= steps[next].at {
			s := steps[next]
			next++
			start := time.Now()
			servers(t, dev, s.action, s.host, s.expect)
			took := time.Since(start)
			waitOn(t, dev, mode, s.on)
			t.Logf("%s %s at %d MiB: command %v, %s reads from %s after %v", s.action, s.host, n>>20,
				took.Round(time.Millisecond), map[string]string{"direct": "every kernel connection", "relay": "the daemon"}[mode],
				s.on, time.Since(start).Round(time.Millisecond))
		}
	})
	if err != nil {
		t.Fatalf("read across the server changes: %v", err)
	}
	t.Logf("read done after %v", time.Since(t0).Round(time.Millisecond))
	if got != want {
		t.Fatal("data read across the server changes differs")
	}
	if next != len(steps) {
		t.Fatalf("only %d of %d steps ran", next, len(steps))
	}
	st := statusJSON(t, dev)["client"].(map[string]any)
	if st["Current"] != addrA || st["Pinned"] != addrA {
		t.Fatalf("client after the read: current %v pinned %v", st["Current"], st["Pinned"])
	}
	if out, _ := nbd(t, "list"); !strings.Contains(out, addrA+" (pinned)") {
		t.Fatalf("list does not show the pinned server:\n%s", out)
	}
	servers(t, dev, "auto", "", "RTT probing chooses the server again")
	if out, code := nbd(t, "servers", dev, "remove", "127.0.0.9:1"); code != 1 || !strings.Contains(out, "not a known server") {
		t.Fatalf("removing an unknown server: exit %d\n%s", code, out)
	}
}

// servers runs `dnbd3-nbd servers DEV ACTION [HOST]` and checks that it
// succeeded and printed expect.
func servers(t *testing.T, dev, action, host, expect string) {
	t.Helper()
	args := []string{"servers", dev, action}
	if host != "" {
		args = append(args, host)
	}
	out, code := nbd(t, args...)
	if code != 0 || !strings.Contains(out, expect) {
		t.Fatalf("dnbd3-nbd %s: exit %d, want %q:\n%s", strings.Join(args, " "), code, expect, out)
	}
}

// waitOn waits until the device reads from server: the client library's
// current server and, on the direct path, every kernel connection.
func waitOn(t *testing.T, dev, mode, server string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := statusJSON(t, dev)
		cur := st["client"].(map[string]any)["Current"]
		sl := st["slots"].(map[string]any)
		on := fmt.Sprint(sl["directOn"])
		ok := cur == server
		if mode == "direct" {
			ok = ok && sl["mode"] == "direct" && on == fmt.Sprintf("map[%s:%v]", server, sl["direct"])
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not read from %s within 30 s: client on %v, slots %v", dev, server, cur, sl)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
