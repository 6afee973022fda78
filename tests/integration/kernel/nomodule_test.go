package kernel

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

// TestNoModule checks the errors without the nbd module. When the harness
// loaded it, the test unloads it (nothing may be connected) and loads it
// again afterwards from $DNBD3GO_NBD_KO; with `vmtest.sh -no-nbd` it runs
// as is.
func TestNoModule(t *testing.T) {
	requireVM(t)
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		st, err := nbdbridge.Status(-1)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st {
			if s.Connected {
				t.Fatalf("cannot unload nbd: %s is still connected", nbdbridge.DevicePath(s.Index))
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := unix.DeleteModule("nbd", unix.O_NONBLOCK)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("rmmod nbd: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Cleanup(func() { loadNBD(t) })
	}

	err := nbdbridge.Available()
	if !errors.Is(err, nbdbridge.ErrNoModule) || !strings.Contains(err.Error(), "modprobe nbd") {
		t.Fatalf("Available: %v", err)
	}
	t.Logf("Available: %v", err)
	_, kfd := socketPair(t)
	defer unix.Close(kfd)
	if _, err := nbdbridge.Connect(nbdbridge.ConnectOptions{Index: -1, SizeBytes: 1 << 20, SocketFDs: []int{kfd}}); !errors.Is(err, nbdbridge.ErrNoModule) {
		t.Fatalf("Connect: %v", err)
	}
	if _, err := nbdbridge.Status(-1); !errors.Is(err, nbdbridge.ErrNoModule) {
		t.Fatalf("Status: %v", err)
	}
	if err := nbdbridge.Disconnect(0); !errors.Is(err, nbdbridge.ErrNoModule) {
		t.Fatalf("Disconnect: %v", err)
	}
	if _, err := nbdbridge.WatchLinkDead(context.Background()); !errors.Is(err, nbdbridge.ErrNoModule) {
		t.Fatalf("WatchLinkDead: %v", err)
	}
	if devs, err := nbdbridge.ListDevices(); err != nil || len(devs) != 0 {
		t.Fatalf("ListDevices without the module = %v, %v", devs, err)
	}
	if os.Getenv("DNBD3GO_VM_CMDS") == "1" {
		out, code := nbd(t, "attach", "-h", "127.0.0.1:1", "-i", "x")
		if code != 1 || !strings.Contains(out, "modprobe nbd") {
			t.Errorf("dnbd3-nbd attach without the module: exit %d\n%s", code, out)
		}
		if out, code := nbd(t, "list"); code != 1 || !strings.Contains(out, "modprobe nbd") {
			t.Errorf("dnbd3-nbd list without the module: exit %d\n%s", code, out)
		}
	}
}

// loadNBD loads nbd.ko like the harness does.
func loadNBD(t *testing.T) {
	ko := os.Getenv("DNBD3GO_NBD_KO")
	fd, err := unix.Open(ko, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("reload nbd: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "nbds_max=16", 0); err != nil {
		t.Fatalf("reload nbd: finit_module %s: %v", ko, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat("/dev/nbd15"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("reload nbd: /dev/nbd15 did not appear")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
