// Package vmbench measures reads through /dev/nbdX inside the VM harness
// (bench/30-vm.sh runs it). Under TCG the absolute figures say little;
// they are reported for information next to the same reads from the
// image file in the guest's tmpfs.
package vmbench

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

const size = 256 << 20

func TestVMBench(t *testing.T) {
	if os.Getenv("DNBD3GO_VM") != "1" || nbdbridge.Available() != nil {
		t.Skip("SKIP: runs inside the VM harness (bench/30-vm.sh)")
	}
	base := t.TempDir()
	img := filepath.Join(base, "b.r1")
	f, _ := os.Create(img)
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for range size >> 20 {
		f.Write(buf)
	}
	f.Close()
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nlistenPort=15010\n[logging]\nconsoleMask=ERROR\n"), 0o644)
	srv := exec.Command("dnbd3-server", "-n", "-c", etc, "-b", "127.0.0.1")
	srv.Start()
	defer func() { srv.Process.Kill(); srv.Wait() }()
	if err := testutil.WaitListening("127.0.0.1:15010", 5*time.Second); err != nil {
		t.Fatalf("dnbd3-server does not listen: %v", err)
	}
	att := exec.Command("dnbd3-nbd", "attach", "-h", "127.0.0.1:15010", "-i", "b", "--log-level", "error")
	out, _ := att.StdoutPipe()
	att.Start()
	defer func() { att.Process.Signal(syscall.SIGTERM); att.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(line)
	for _, target := range []struct{ name, path string }{{"/dev/nbdX (dnbd3-nbd attach)", dev}, {"image file in tmpfs", img}} {
		seq := measure(t, target.path, 1<<20, 8, false)
		rnd := measure(t, target.path, 4096, 32, true)
		fmt.Printf("VMBENCH %-30s seq 1 MiB QD8: %7.1f MB/s   rand 4 KiB QD32: %8.0f IOPS\n", target.name, seq/1e6, rnd)
	}
}

// measure reads with O_DIRECT from qd goroutines for 3 s and returns bytes/s
// (sequential) or IOPS (random).
func measure(t *testing.T, path string, bs, qd int, random bool) float64 {
	flags := os.O_RDONLY | unix.O_DIRECT
	if strings.HasPrefix(path, "/tmp") || !strings.HasPrefix(path, "/dev/") {
		flags = os.O_RDONLY // tmpfs has no O_DIRECT
	}
	var ops, next atomic.Int64
	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for g := range qd {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(path, flags, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			b, _ := unix.Mmap(-1, 0, bs, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			defer unix.Munmap(b)
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for time.Now().Before(stop) {
				off := (next.Add(1) - 1) * int64(bs) % size
				if random {
					off = rng.Int64N(size/int64(bs)) * int64(bs)
				}
				if _, err := f.ReadAt(b, off); err != nil {
					t.Error(err)
					return
				}
				ops.Add(1)
			}
		}()
	}
	wg.Wait()
	if random {
		return float64(ops.Load()) / 3
	}
	return float64(ops.Load()*int64(bs)) / 3
}
