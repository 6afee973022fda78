package kernel

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

// mbr writes an MBR partition table with one Linux partition per
// [start, count) sector range.
func mbr(disk []byte, parts ...[2]uint32) {
	for i, p := range parts {
		e := disk[446+16*i:]
		e[4] = 0x83
		binary.LittleEndian.PutUint32(e[8:], p[0])
		binary.LittleEndian.PutUint32(e[12:], p[1])
	}
	disk[510], disk[511] = 0x55, 0xaa
}

// TestPartitionsWaitReady: WaitReady triggers the partition scan and
// returns once the partition nodes exist.
func TestPartitionsWaitReady(t *testing.T) {
	requireNBD(t)
	srv := newMemServer(8 << 20)
	srv.mu.Lock()
	mbr(srv.data, [2]uint32{2048, 4096}, [2]uint32{6144, 8192})
	copy(srv.data[2048*512:], "partition one")
	srv.mu.Unlock()
	a := attach(t, srv, nbdbridge.ConnectOptions{Index: -1, Timeout: 30 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	if err := nbdbridge.WaitReady(ctx, a.idx, 8<<20); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	t.Logf("WaitReady with 2 partitions took %v", time.Since(start).Round(time.Microsecond))
	name := filepath.Base(nbdbridge.DevicePath(a.idx))
	parts, err := nbdbridge.Sysfs{}.Partitions(a.idx)
	if err != nil || !slices.Equal(parts, []string{name + "p1", name + "p2"}) {
		t.Fatalf("partitions = %v, %v", parts, err)
	}
	sz, err := os.ReadFile(filepath.Join("/sys/block", name, name+"p1", "size"))
	if err != nil || strings.TrimSpace(string(sz)) != "4096" {
		t.Fatalf("%sp1 size = %q, %v", name, sz, err)
	}
	f := openDirect(t, "/dev/"+name+"p1", os.O_RDONLY)
	buf := testutil.AlignedBuf(t, 4096)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.HasPrefix(buf, []byte("partition one")) {
		t.Fatalf("read of %sp1: %v %q", name, err, buf[:16])
	}
}

// TestMkfsMount: the harness's mkfs.ext4 works on the device, a mount
// makes InUse true, and the data survives umount and mount.
func TestMkfsMount(t *testing.T) {
	requireNBD(t)
	const size = 64 << 20
	srv := newMemServer(size)
	a := attach(t, srv, nbdbridge.ConnectOptions{Index: -1, Timeout: 30 * time.Second,
		ServerFlags: nbdFlagHasFlags | nbdFlagSendFlush | nbdFlagSendFUA | nbdFlagSendTrim})
	dev := nbdbridge.DevicePath(a.idx)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := nbdbridge.WaitReady(ctx, a.idx, size); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mkfs(t, dev)
	t.Logf("mkfs.ext4 on 64 MiB took %v (FLUSH %d, TRIM %d)", time.Since(start).Round(time.Millisecond),
		srv.count(nbdCmdFlush), srv.count(nbdCmdTrim))
	mnt := t.TempDir()
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		t.Fatalf("mount: %v", err)
	}
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
	}()
	if busy, err := nbdbridge.InUse(a.idx); err != nil || !busy {
		t.Fatalf("InUse while mounted = %v, %v", busy, err)
	}
	data := randomBytes(4, 3<<20)
	if err := os.WriteFile(filepath.Join(mnt, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("umount: %v", err)
	}
	mounted = false
	if busy, err := nbdbridge.InUse(a.idx); err != nil || busy {
		t.Fatalf("InUse after umount = %v, %v", busy, err)
	}
	if err := unix.Mount(dev, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount again: %v", err)
	}
	mounted = true
	got, err := os.ReadFile(filepath.Join(mnt, "f"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file after remount: %v, equal=%v", err, bytes.Equal(got, data))
	}
}

// TestCommandsOnPath: the harness put the project's commands on PATH.
func TestCommandsOnPath(t *testing.T) {
	requireVM(t)
	if os.Getenv("DNBD3GO_VM_CMDS") == "0" {
		t.Skip("harness run with -cmds none")
	}
	for _, c := range []string{"dnbd3-server", "dnbd3-nbd", "mkfs.ext4"} {
		p, err := exec.LookPath(c)
		if err != nil {
			t.Fatalf("%s: %v", c, err)
		}
		t.Logf("%s -> %s", c, p)
	}
}
