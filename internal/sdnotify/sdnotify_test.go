package sdnotify_test

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/sdnotify"
	"github.com/dnbd3go/dnbd3go/internal/sdnotify/sdnotifytest"
)

func TestReadyStatusStopping(t *testing.T) {
	sock := sdnotifytest.Listen(t)
	t.Setenv("NOTIFY_SOCKET", sock.Path)
	t.Setenv("WATCHDOG_USEC", "")
	var clients atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	n := sdnotify.Start(ctx, sdnotify.Options{
		Status:   func() string { return "serving 12 images, " + strconv.Itoa(int(clients.Load())) + " clients" },
		Interval: 20 * time.Millisecond,
	})
	first, _ := sock.Next(2 * time.Second)
	if first != "READY=1\nSTATUS=serving 12 images, 0 clients" {
		t.Fatalf("first message %q, want READY=1 with the status", first)
	}
	clients.Store(340)
	if m := sock.WaitFor(t, "STATUS=", 2*time.Second); m != "STATUS=serving 12 images, 340 clients" {
		t.Fatalf("status update %q", m)
	}
	// An unchanged status is not sent again.
	if m, ok := sock.Next(100 * time.Millisecond); ok {
		t.Fatalf("unexpected message %q for an unchanged status", m)
	}
	cancel()
	if m := sock.WaitFor(t, "STOPPING=1", 2*time.Second); m != "STOPPING=1\nSTATUS=stopping" {
		t.Fatalf("stopping message %q", m)
	}
	n.Stop()
	if m, ok := sock.Next(100 * time.Millisecond); ok {
		t.Fatalf("message %q after Stop; STOPPING=1 must be sent once", m)
	}
}

func TestStopWithoutCancel(t *testing.T) {
	sock := sdnotifytest.Listen(t)
	t.Setenv("NOTIFY_SOCKET", sock.Path)
	n := sdnotify.Start(context.Background(), sdnotify.Options{})
	if m, _ := sock.Next(2 * time.Second); m != "READY=1" {
		t.Fatalf("got %q, want READY=1 alone without a Status func", m)
	}
	n.Stop()
	sock.WaitFor(t, "STOPPING=1", 2*time.Second)
}

func TestWatchdog(t *testing.T) {
	sock := sdnotifytest.Listen(t)
	t.Setenv("NOTIFY_SOCKET", sock.Path)
	t.Setenv("WATCHDOG_USEC", "100000") // 100 ms: pings every 50 ms
	t.Setenv("WATCHDOG_PID", "")
	n := sdnotify.Start(context.Background(), sdnotify.Options{Interval: time.Hour})
	defer n.Stop()
	sock.WaitFor(t, "READY=1", 2*time.Second)
	start := time.Now()
	for i := 0; i < 3; i++ {
		sock.WaitFor(t, "WATCHDOG=1", 2*time.Second)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("3 watchdog pings in %v: sent faster than half of WATCHDOG_USEC", d)
	}
}

func TestWatchdogOtherPID(t *testing.T) {
	sock := sdnotifytest.Listen(t)
	t.Setenv("NOTIFY_SOCKET", sock.Path)
	t.Setenv("WATCHDOG_USEC", "20000")
	t.Setenv("WATCHDOG_PID", "1") // meant for another process
	n := sdnotify.Start(context.Background(), sdnotify.Options{Interval: time.Hour})
	defer n.Stop()
	sock.WaitFor(t, "READY=1", 2*time.Second)
	if m, ok := sock.Next(150 * time.Millisecond); ok {
		t.Fatalf("got %q: the watchdog belongs to WATCHDOG_PID, not this process", m)
	}
}

func TestNoSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := sdnotify.Start(context.Background(), sdnotify.Options{Status: func() string { return "x" }})
	n.Stop() // must neither block nor panic
}
