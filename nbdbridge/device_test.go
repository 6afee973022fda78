package nbdbridge

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestDevicePathAndParseDevice(t *testing.T) {
	if got := DevicePath(3); got != "/dev/nbd3" {
		t.Fatalf("DevicePath(3) = %q", got)
	}
	good := map[string]int{"/dev/nbd3": 3, "nbd3": 3, "3": 3, "nbd0": 0, "/dev/nbd15": 15, "nbd1023": 1023}
	for in, want := range good {
		got, err := ParseDevice(in)
		if err != nil || got != want {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	bad := []string{"", "nbd", "/dev/nbd", "/dev/sda", "/dev/3", "nbd-1", "-1", "nbd03", "nbd3x", "loop0", "nbd 3", "+3", "nbd99999999"}
	for _, in := range bad {
		if got, err := ParseDevice(in); err == nil {
			t.Errorf("ParseDevice(%q) = %d, want an error", in, got)
		}
	}
	_, err := ParseDevice("/dev/nbd3p1")
	if err == nil || !strings.Contains(err.Error(), "partition") || !strings.Contains(err.Error(), "/dev/nbd3") {
		t.Errorf("ParseDevice(partition) error = %v, want a hint naming /dev/nbd3", err)
	}
}

// fakeSys builds a fake sysfs, /dev and mountinfo below a temp directory.
type fakeSys struct {
	t   *testing.T
	sys Sysfs
}

func newFakeSys(t *testing.T) *fakeSys {
	dir := t.TempDir()
	s := Sysfs{Root: filepath.Join(dir, "sys"), Dev: filepath.Join(dir, "dev"), MountInfo: filepath.Join(dir, "mountinfo")}
	for _, d := range []string{filepath.Join(s.Root, "block"), s.Dev, filepath.Join(s.Root, "module", "nbd", "parameters")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f := &fakeSys{t: t, sys: s}
	f.write("module/nbd/parameters/nbds_max", "16\n")
	f.mountinfo("22 1 0:21 / /proc rw,nosuid - proc proc rw\n")
	return f
}

func (f *fakeSys) write(rel, content string) {
	f.t.Helper()
	p := filepath.Join(f.sys.Root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeSys) mountinfo(content string) {
	f.t.Helper()
	if err := os.WriteFile(f.sys.MountInfo, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// device adds nbdN with size sectors, major:minor 43:N*32 and a device node.
func (f *fakeSys) device(n int, sectors string) {
	name := "nbd" + itoa(n)
	f.write("block/"+name+"/size", sectors+"\n")
	f.write("block/"+name+"/dev", "43:"+itoa(n*32)+"\n")
	if err := os.MkdirAll(filepath.Join(f.sys.Root, "block", name, "holders"), 0o755); err != nil {
		f.t.Fatal(err)
	}
	f.node(name)
}

func (f *fakeSys) partition(n, p int) {
	name := "nbd" + itoa(n) + "p" + itoa(p)
	f.write("block/nbd"+itoa(n)+"/"+name+"/dev", "43:"+itoa(n*32+p)+"\n")
	f.write("block/nbd"+itoa(n)+"/"+name+"/size", "100\n")
}

func (f *fakeSys) node(name string) {
	f.t.Helper()
	if err := os.WriteFile(filepath.Join(f.sys.Dev, name), nil, 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func itoa(n int) string { return DevicePath(n)[len("/dev/nbd"):] }

func TestSysfsAttributes(t *testing.T) {
	f := newFakeSys(t)
	f.device(0, "0")
	f.device(2, "2048")
	f.device(10, "8")
	f.write("block/nbd2/pid", "1234\n")
	f.write("block/nbd2/backend", "dnbd3:ubuntu.r7\n")
	f.write("block/nbd10/backend", "other id\n")
	f.write("block/sda/size", "100\n")
	f.write("block/nbdx/size", "100\n")
	s := f.sys

	devs, err := s.Devices()
	if err != nil || !slices.Equal(devs, []int{0, 2, 10}) {
		t.Fatalf("Devices() = %v, %v", devs, err)
	}
	if sz, err := s.Size(2); err != nil || sz != 2048*512 {
		t.Fatalf("Size(2) = %d, %v", sz, err)
	}
	if sz, err := s.Size(0); err != nil || sz != 0 {
		t.Fatalf("Size(0) = %d, %v", sz, err)
	}
	if _, err := s.Size(5); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Size(5) error = %v, want ErrNotExist", err)
	}
	if pid, err := s.PID(2); err != nil || pid != 1234 {
		t.Fatalf("PID(2) = %d, %v", pid, err)
	}
	if _, err := s.PID(0); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("PID(0) error = %v, want ErrNotExist", err)
	}
	if id, err := s.BackendID(10); err != nil || id != "other id" {
		t.Fatalf("BackendID(10) = %q, %v", id, err)
	}
	if _, err := s.BackendID(0); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("BackendID(0) error = %v, want ErrNotExist", err)
	}
	if got, err := s.FindByBackend("dnbd3:ubuntu.r7"); err != nil || !slices.Equal(got, []int{2}) {
		t.Fatalf("FindByBackend = %v, %v", got, err)
	}
	if got, err := s.FindByBackend("nope"); err != nil || len(got) != 0 {
		t.Fatalf("FindByBackend(nope) = %v, %v", got, err)
	}
	if _, err := s.FindByBackend(""); err == nil {
		t.Fatal("FindByBackend(\"\") succeeded")
	}
	if n, err := s.NBDSMax(); err != nil || n != 16 {
		t.Fatalf("NBDSMax = %d, %v", n, err)
	}
	if !s.Exists(2) || s.Exists(3) {
		t.Fatal("Exists is wrong")
	}
	if got := s.Path(10); got != filepath.Join(s.Dev, "nbd10") {
		t.Fatalf("Path(10) = %q", got)
	}
	f.write("block/nbd10/size", "garbage\n")
	if _, err := s.Size(10); err == nil {
		t.Fatal("Size accepted garbage")
	}
}

func TestSysfsPartitions(t *testing.T) {
	f := newFakeSys(t)
	f.device(1, "4096")
	f.partition(1, 10)
	f.partition(1, 2)
	f.partition(1, 1)
	f.write("block/nbd1/nbd11p1/dev", "1:1\n") // not a partition of nbd1
	got, err := f.sys.Partitions(1)
	if err != nil || !slices.Equal(got, []string{"nbd1p1", "nbd1p2", "nbd1p10"}) {
		t.Fatalf("Partitions(1) = %v, %v", got, err)
	}
}

func TestSysfsInUse(t *testing.T) {
	f := newFakeSys(t)
	f.device(3, "2048")
	f.partition(3, 1)
	f.node("nbd3p1")
	s := f.sys

	if busy, err := s.InUse(3); err != nil || busy {
		t.Fatalf("idle device: InUse = %v, %v", busy, err)
	}

	// mounted, found by major:minor of a partition
	f.mountinfo("22 1 0:21 / /proc rw - proc proc rw\n30 1 43:97 / /mnt rw,relatime shared:1 - ext4 /dev/whatever rw\n")
	if busy, err := s.InUse(3); err != nil || !busy {
		t.Fatalf("partition mounted by dev: InUse = %v, %v", busy, err)
	}
	// mounted, found by source (btrfs shows an anonymous major:minor)
	f.mountinfo("31 1 0:55 / /data rw - btrfs /dev/nbd3 rw\n")
	if busy, err := s.InUse(3); err != nil || !busy {
		t.Fatalf("mounted by source: InUse = %v, %v", busy, err)
	}
	// another device's mounts do not count
	f.mountinfo("31 1 43:128 / /data rw - ext4 /dev/nbd4 rw\n32 1 0:56 / /x rw - ext4 /dev/nbd30 rw\n")
	if busy, err := s.InUse(3); err != nil || busy {
		t.Fatalf("other device mounted: InUse = %v, %v", busy, err)
	}

	// holders of the partition (e.g. device mapper)
	f.write("block/nbd3/nbd3p1/holders/dm-0", "")
	if busy, err := s.InUse(3); err != nil || !busy {
		t.Fatalf("partition held: InUse = %v, %v", busy, err)
	}
	os.RemoveAll(filepath.Join(s.Root, "block/nbd3/nbd3p1/holders"))
	f.write("block/nbd3/holders/md0", "")
	if busy, err := s.InUse(3); err != nil || !busy {
		t.Fatalf("device held: InUse = %v, %v", busy, err)
	}
	os.RemoveAll(filepath.Join(s.Root, "block/nbd3/holders"))

	// no device node: the exclusive-open probe cannot run
	os.Remove(filepath.Join(s.Dev, "nbd3"))
	if _, err := s.InUse(3); err == nil {
		t.Fatal("InUse without a device node succeeded")
	}
	if _, err := s.InUse(7); err == nil {
		t.Fatal("InUse of a missing device succeeded")
	}
}

func TestSysfsWaitReady(t *testing.T) {
	f := newFakeSys(t)
	f.device(4, "0")
	s := f.sys

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	err := s.WaitReady(ctx, 4, 1<<20)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "has 0") {
		t.Fatalf("WaitReady on a size-0 device: %v", err)
	}

	// the size appears later, together with a partition whose node comes last
	go func() {
		time.Sleep(20 * time.Millisecond)
		f.partition(4, 1)
		f.write("block/nbd4/size", "2048\n")
		time.Sleep(30 * time.Millisecond)
		f.node("nbd4p1")
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.WaitReady(ctx, 4, 2048*512); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.Dev, "nbd4p1")); err != nil {
		t.Fatalf("WaitReady returned before the partition node existed (%v after start)", time.Since(start))
	}

	// missing device node: a clear error
	f.device(5, "8")
	os.Remove(filepath.Join(s.Dev, "nbd5"))
	if err := s.WaitReady(ctx, 5, 8*512); err == nil || !strings.Contains(err.Error(), "nbd5") {
		t.Fatalf("WaitReady without a node: %v", err)
	}
}
