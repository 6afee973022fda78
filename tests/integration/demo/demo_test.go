// Package demo is the second half of `make demo`: attach the demo image as
// /dev/nbdX, mount it and list its files. It runs directly where the nbd
// driver is usable (root, module loaded) and otherwise inside the VM
// harness; scripts/demo.sh decides which and says so.
package demo

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

func say(format string, a ...any) { fmt.Printf("demo: "+format+"\n", a...) }

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestDemo(t *testing.T) {
	images := os.Getenv("DNBD3GO_DEMO_IMAGES")
	if images == "" {
		images = "/testdata/images"
	}
	if _, err := os.Stat(filepath.Join(images, "demo.r1")); err != nil {
		t.Skipf("SKIP: no demo image in %s (run make demo)", images)
	}
	if err := nbdbridge.Available(); err != nil {
		t.Skipf("SKIP: the kernel NBD driver is not usable here: %v", err)
	}
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+images+"\nlistenPort=15004\n[logging]\nconsoleMask=ERROR WARNING\n"), 0o644)
	srv := exec.Command("dnbd3-server", "-n", "-c", etc, "-b", "127.0.0.1")
	srv.Stdout, srv.Stderr = os.Stdout, os.Stdout
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	if err := testutil.WaitListening("127.0.0.1:15004", 5*time.Second); err != nil {
		t.Fatalf("dnbd3-server did not start: %v", err)
	}

	say("dnbd3-nbd attach -h 127.0.0.1:15004 -i demo")
	att := exec.Command("dnbd3-nbd", "attach", "-h", "127.0.0.1:15004", "-i", "demo", "--log-level", "warning")
	stdout, _ := att.StdoutPipe()
	att.Stderr = os.Stdout
	if err := att.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	dev := strings.TrimSpace(line)
	say("attached as %s", dev)
	fmt.Print(run(t, "dnbd3-nbd", "list"))

	mnt := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(mnt, 0o755)
	say("mount -o ro,noload %s %s", dev, mnt)
	run(t, "mount", "-t", "ext4", "-o", "ro,noload", dev, mnt)
	fmt.Print(run(t, "ls", "-l", mnt))
	hello, _ := os.ReadFile(filepath.Join(mnt, "hello.txt"))
	say("hello.txt: %s", strings.TrimSpace(string(hello)))
	got := testutil.SHA256File(t, filepath.Join(mnt, "random.bin"))
	want, _ := os.ReadFile(filepath.Join(mnt, "random.bin.sha256"))
	say("random.bin sha256 %s (recorded when the image was made: %s)", got, strings.TrimSpace(string(want)))
	if got != strings.TrimSpace(string(want)) {
		t.Fatal("random.bin differs")
	}
	run(t, "umount", mnt)
	say("dnbd3-nbd detach %s", dev)
	fmt.Print(run(t, "dnbd3-nbd", "detach", dev))
	if err := att.Wait(); err != nil {
		t.Fatalf("attach exited with %v", err)
	}
	say("done")
}
