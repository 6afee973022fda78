package main

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/sdnotify/sdnotifytest"
)

func TestAttachStatusLine(t *testing.T) {
	cases := []struct {
		st   attachStatus
		want string
	}{
		{attachStatus{Device: "/dev/nbd3", Client: client.Stats{Current: "10.0.0.5:5003", CurrentRTT: 400 * time.Microsecond}},
			"attached /dev/nbd3 via 10.0.0.5:5003, RTT 0.4 ms"},
		{attachStatus{Device: "/dev/nbd0", Client: client.Stats{Panic: true, PanicFor: 12300 * time.Millisecond}},
			"attached /dev/nbd0, no server: failing over for 12s"},
		{attachStatus{Device: "/dev/nbd1", Client: client.Stats{Current: "[::1]:5003", CurrentRTT: 25 * time.Millisecond},
			COW: &cowStatus{DirtyClusters: 7}},
			"attached /dev/nbd1 via [::1]:5003, RTT 25.0 ms, 7 clusters to upload"},
	}
	for _, c := range cases {
		if got := c.st.line(); got != c.want {
			t.Errorf("line() = %q, want %q", got, c.want)
		}
	}
}

// TestNotifyAttached checks the call attach makes once the device is
// ready: READY=1 with the status line, and STOPPING=1 on SIGTERM (ctx).
func TestNotifyAttached(t *testing.T) {
	sock := sdnotifytest.Listen(t)
	t.Setenv("NOTIFY_SOCKET", sock.Path)
	ctx, cancel := context.WithCancel(context.Background())
	st := attachStatus{Device: "/dev/nbd3", Client: client.Stats{Current: "10.0.0.5:5003", CurrentRTT: 400 * time.Microsecond}}
	sd := notifyAttached(ctx, slog.New(slog.DiscardHandler), func() attachStatus { return st })
	if m, _ := sock.Next(2 * time.Second); m != "READY=1\nSTATUS=attached /dev/nbd3 via 10.0.0.5:5003, RTT 0.4 ms" {
		t.Fatalf("first message %q", m)
	}
	cancel()
	sock.WaitFor(t, "STOPPING=1", 2*time.Second)
	sd.Stop()
}
