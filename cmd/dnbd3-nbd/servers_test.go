package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

// TestServerControl: the control operations behind `dnbd3-nbd servers`
// change the image's server list, and ask the device to move its
// kernel-direct connections only when the current server changed.
func TestServerControl(t *testing.T) {
	data := genImage(256 << 10)
	a := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: data})
	b := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: data})
	ctx := context.Background()
	img, err := client.Open(ctx, client.Config{Servers: []string{a.Addr()}, Image: "img", Sticky: true, NoProbe: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	moves := 0
	moved := func() { moves++ }
	do := func(op, server string) (serverChange, error) {
		t.Helper()
		v, ok, err := serverControl(ctx, img, nbdbridge.ControlRequest{Op: op, Server: server}, moved)
		if !ok {
			t.Fatalf("%s not handled", op)
		}
		res, _ := v.(serverChange)
		return res, err
	}
	if res, err := do("add-server", b.Addr()); err != nil || len(res.Servers) != 1 || res.Current != a.Addr() || moves != 0 {
		t.Fatalf("add: %+v %v, moves %d", res, err, moves)
	}
	if res, err := do("switch-server", b.Addr()); err != nil || res.Current != b.Addr() || res.Pinned != b.Addr() || moves != 1 {
		t.Fatalf("switch: %+v %v, moves %d", res, err, moves)
	}
	if res, err := do("unpin", ""); err != nil || res.Pinned != "" || moves != 1 {
		t.Fatalf("unpin: %+v %v, moves %d", res, err, moves)
	}
	if _, err := do("remove-server", b.Addr()); err != nil || moves != 2 {
		t.Fatalf("remove the current server: %v, moves %d", err, moves)
	}
	deadline := time.Now().Add(10 * time.Second)
	for img.Current() != a.Addr() {
		if time.Now().After(deadline) {
			t.Fatalf("no failover to %s after removing %s: current %q", a.Addr(), b.Addr(), img.Current())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := do("add-server", "a b"); err == nil || !strings.Contains(err.Error(), "bad server") {
		t.Fatalf("add with a bad server: %v", err)
	}
	if _, ok, _ := serverControl(ctx, img, nbdbridge.ControlRequest{Op: "status"}, moved); ok {
		t.Fatal("status handled as a server operation")
	}
	buf := make([]byte, len(data))
	if _, err := img.ReadAt(buf, 0); err != nil || string(buf) != string(data) {
		t.Fatalf("read after the changes: %v", err)
	}
}
