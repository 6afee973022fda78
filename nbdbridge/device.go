package nbdbridge

// Device helpers: names, sysfs attributes (/sys/block/nbdN/...), whether a
// device is in use, and waiting until a freshly connected device is ready.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const sectorSize = 512

// partitionWait bounds how long WaitReady waits for partition device
// nodes once the kernel has created the partitions.
const partitionWait = 10 * time.Second

// DevicePath returns the device node of NBD device index: /dev/nbdN.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// ParseDevice parses an NBD device name: "/dev/nbd3", "nbd3" or "3".
func ParseDevice(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	num, isNBD := strings.CutPrefix(name, "nbd")
	if !isNBD && name != s {
		return -1, fmt.Errorf("nbdbridge: %q is not an NBD device: use /dev/nbdN, nbdN or N", s)
	}
	if base, _, ok := strings.Cut(num, "p"); ok && isNBD && isIndex(base) {
		return -1, fmt.Errorf("nbdbridge: %q is a partition: name the whole device, %s", s, DevicePath(atoi(base)))
	}
	if !isIndex(num) {
		return -1, fmt.Errorf("nbdbridge: %q is not an NBD device: use /dev/nbdN, nbdN or N", s)
	}
	return atoi(num), nil
}

// isIndex reports whether s is a device number in canonical decimal form.
func isIndex(s string) bool {
	if s == "" || len(s) > 7 || (len(s) > 1 && s[0] == '0') {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// Sysfs reads NBD device state from sysfs and the device nodes in /dev.
// The zero value uses the real /sys, /dev and /proc/self/mountinfo; tests
// point the fields at a fake tree.
type Sysfs struct {
	Root      string // sysfs mount point; "" means /sys
	Dev       string // device node directory; "" means /dev
	MountInfo string // mount table; "" means /proc/self/mountinfo
	Proc      string // procfs mount point for the open-file scan; "" means /proc
}

func (s Sysfs) proc() string {
	if s.Proc == "" {
		return "/proc"
	}
	return s.Proc
}

func (s Sysfs) root() string {
	if s.Root == "" {
		return "/sys"
	}
	return s.Root
}

func (s Sysfs) mountInfo() string {
	if s.MountInfo == "" {
		return "/proc/self/mountinfo"
	}
	return s.MountInfo
}

// Path returns the device node of device index.
func (s Sysfs) Path(index int) string {
	if s.Dev == "" {
		return DevicePath(index)
	}
	return filepath.Join(s.Dev, "nbd"+strconv.Itoa(index))
}

func (s Sysfs) devNode(name string) string {
	if s.Dev == "" {
		return "/dev/" + name
	}
	return filepath.Join(s.Dev, name)
}

func (s Sysfs) blockDir(index int) string {
	return filepath.Join(s.root(), "block", "nbd"+strconv.Itoa(index))
}

// readAttr reads a sysfs attribute of device index without its newline.
func (s Sysfs) readAttr(index int, attr string) (string, error) {
	b, err := os.ReadFile(filepath.Join(s.blockDir(index), attr))
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(string(b), "\n"), nil
}

// Devices lists the indexes of all NBD devices, sorted.
func (s Sysfs) Devices() ([]int, error) {
	ents, err := os.ReadDir(filepath.Join(s.root(), "block"))
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var out []int
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "nbd") {
			continue
		}
		if n, err := ParseDevice(name); err == nil {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

// Exists reports whether device index exists.
func (s Sysfs) Exists(index int) bool {
	_, err := os.Stat(s.blockDir(index))
	return err == nil
}

// Size returns the device size in bytes (0 while disconnected).
func (s Sysfs) Size(index int) (int64, error) {
	v, err := s.readAttr(index, "size")
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", DevicePath(index), err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("nbdbridge: size of %s: bad sysfs value %q", DevicePath(index), v)
	}
	return n * sectorSize, nil
}

// PID returns the pid of the process that connected device index. The
// attribute exists only while the device is connected; otherwise the
// error wraps fs.ErrNotExist.
func (s Sysfs) PID(index int) (int, error) {
	v, err := s.readAttr(index, "pid")
	if err != nil {
		return 0, fmt.Errorf("pid of %s: %w", DevicePath(index), err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		return 0, fmt.Errorf("nbdbridge: pid of %s: bad sysfs value %q", DevicePath(index), v)
	}
	return n, nil
}

// BackendID returns the backend identifier device index was connected
// with. The attribute exists only on kernels from 5.14 for devices
// connected with an identifier; otherwise the error wraps fs.ErrNotExist.
func (s Sysfs) BackendID(index int) (string, error) {
	v, err := s.readAttr(index, "backend")
	if err != nil {
		return "", fmt.Errorf("backend of %s: %w", DevicePath(index), err)
	}
	return v, nil
}

// FindByBackend returns the devices whose backend identifier is id.
func (s Sysfs) FindByBackend(id string) ([]int, error) {
	if id == "" {
		return nil, errors.New("nbdbridge: find nbd device: empty backend identifier")
	}
	devs, err := s.Devices()
	if err != nil {
		return nil, err
	}
	var out []int
	for _, d := range devs {
		if v, err := s.BackendID(d); err == nil && v == id {
			out = append(out, d)
		}
	}
	return out, nil
}

// Partitions returns the names of device index's partitions ("nbd3p1",
// ...), sorted by number.
func (s Sysfs) Partitions(index int) ([]string, error) {
	ents, err := os.ReadDir(s.blockDir(index))
	if err != nil {
		return nil, fmt.Errorf("partitions of %s: %w", DevicePath(index), err)
	}
	prefix := "nbd" + strconv.Itoa(index) + "p"
	type part struct {
		name string
		n    int
	}
	var parts []part
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(rest); err == nil && n > 0 {
			parts = append(parts, part{e.Name(), n})
		}
	}
	slices.SortFunc(parts, func(a, b part) int { return a.n - b.n })
	out := make([]string, len(parts))
	for i, p := range parts {
		out[i] = p.name
	}
	return out, nil
}

// NBDSMax returns the nbd module's nbds_max parameter: how many devices
// it created when it was loaded.
func (s Sysfs) NBDSMax() (int, error) {
	b, err := os.ReadFile(filepath.Join(s.root(), "module", "nbd", "parameters", "nbds_max"))
	if err != nil {
		return 0, fmt.Errorf("read nbds_max: %w", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("nbdbridge: read nbds_max: bad value %q", b)
	}
	return n, nil
}

// InUse reports whether device index is in use by someone else: it (or
// one of its partitions) has holders (device mapper, md, ...), is
// mounted, is open exclusively (mounts, swap, mkfs, another InUse) -
// found by trying an exclusive open, which fails with EBUSY - or is open
// in another process (dd, a VM using the device), found by scanning
// /proc/*/fd like fuser does.
// With ClientFlagDisconnectOnClose the probing open's close disconnects
// an otherwise unused device.
func (s Sysfs) InUse(index int) (bool, error) {
	parts, err := s.Partitions(index)
	if err != nil {
		return false, fmt.Errorf("check whether %s is in use: %w", DevicePath(index), err)
	}
	names := append([]string{"nbd" + strconv.Itoa(index)}, parts...)
	var devs []string // major:minor of the device and its partitions
	for i, name := range names {
		rel := "" // sysfs directory relative to the device's
		if i > 0 {
			rel = name
		}
		holders, err := os.ReadDir(filepath.Join(s.blockDir(index), rel, "holders"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("check holders of %s: %w", name, err)
		}
		if len(holders) > 0 {
			return true, nil
		}
		if v, err := s.readAttr(index, filepath.Join(rel, "dev")); err == nil {
			devs = append(devs, strings.TrimSpace(v))
		}
	}
	mounted, err := s.mounted(names, devs)
	if err != nil {
		return false, err
	}
	if mounted {
		return true, nil
	}
	if open, err := s.openElsewhere(devs); err != nil || open {
		return open, err
	}
	fd, err := unix.Open(s.Path(index), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return true, nil
		}
		return false, fmt.Errorf("check whether %s is in use: open exclusively: %w", s.Path(index), err)
	}
	unix.Close(fd)
	return false, nil
}

// openElsewhere reports whether another process has one of the block
// devices devs ("major:minor") open: a /proc/PID/fd entry whose target has
// one of these device numbers.
func (s Sysfs) openElsewhere(devs []string) (bool, error) {
	rdevs := map[uint64]bool{}
	for _, v := range devs {
		var maj, mnr uint32
		if _, err := fmt.Sscanf(v, "%d:%d", &maj, &mnr); err == nil {
			rdevs[unix.Mkdev(maj, mnr)] = true
		}
	}
	if len(rdevs) == 0 {
		return false, nil
	}
	procs, err := os.ReadDir(s.proc())
	if err != nil {
		return false, fmt.Errorf("scan open files: %w", err)
	}
	self := strconv.Itoa(os.Getpid())
	for _, p := range procs {
		if p.Name() == self || p.Name()[0] < '0' || p.Name()[0] > '9' {
			continue
		}
		fdDir := filepath.Join(s.proc(), p.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // gone, or not ours to look at
		}
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(filepath.Join(fdDir, fd.Name()), &st) != nil {
				continue
			}
			if st.Mode&unix.S_IFMT == unix.S_IFBLK && rdevs[st.Rdev] {
				return true, nil
			}
		}
	}
	return false, nil
}

// mounted reports whether one of the block devices names (device node
// names) or devs ("major:minor") appears in the mount table, by
// major:minor or by source path.
func (s Sysfs) mounted(names, devs []string) (bool, error) {
	sources := map[string]bool{}
	for _, name := range names {
		sources[s.devNode(name)] = true
		sources["/dev/"+name] = true
	}
	f, err := os.Open(s.mountInfo())
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		if slices.Contains(devs, fields[2]) {
			return true, nil
		}
		for i, f := range fields {
			if f == "-" && i+2 < len(fields) {
				if sources[fields[i+2]] {
					return true, nil
				}
				break
			}
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	return false, nil
}

// WaitReady waits until device index is usable after a CONNECT: its size
// is wantSize, its partition table has been scanned, and a device node
// exists for every partition the kernel found. The scan is triggered by
// opening the device once (and BLKRRPART if that found no partitions, for
// kernels that do not scan on first open), which reads from the device:
// the server must already be serving. The open itself cannot be
// interrupted by ctx. With ClientFlagDisconnectOnClose the close of that
// open disconnects the device unless someone else holds it open.
func (s Sysfs) WaitReady(ctx context.Context, index int, wantSize int64) error {
	dev := s.Path(index)
	delay := time.Millisecond
	for {
		size, err := s.Size(index)
		if err == nil && size == wantSize {
			break
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("wait for %s: %w (%w)", dev, ctx.Err(), err)
			}
			return fmt.Errorf("wait for %s to reach %d bytes (it has %d): %w", dev, wantSize, size, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s to scan its partitions: %w", dev, err)
	}
	parts, err := s.Partitions(index)
	if err == nil && len(parts) == 0 {
		// EINVAL: partitions disabled (max_part=0); EBUSY: in use.
		if ierr := unix.IoctlSetInt(fd, unix.BLKRRPART, 0); ierr == nil {
			parts, err = s.Partitions(index)
		}
	}
	unix.Close(fd)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(partitionWait)
	for _, p := range parts {
		for delay = time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
			if _, err := os.Stat(s.devNode(p)); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("nbdbridge: partition %s of %s has no device node after %v (is devtmpfs mounted on /dev?)", p, dev, partitionWait)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("wait for partition %s of %s: %w", p, dev, ctx.Err())
			case <-time.After(delay):
			}
		}
	}
	return nil
}

// ListDevices lists the indexes of all NBD devices, sorted.
func ListDevices() ([]int, error) { return Sysfs{}.Devices() }

// DeviceSize returns the size of device index in bytes (0 while
// disconnected).
func DeviceSize(index int) (int64, error) { return Sysfs{}.Size(index) }

// DevicePID returns the pid of the process that connected device index.
func DevicePID(index int) (int, error) { return Sysfs{}.PID(index) }

// DeviceBackend returns the backend identifier of device index; the error
// wraps fs.ErrNotExist if it has none.
func DeviceBackend(index int) (string, error) { return Sysfs{}.BackendID(index) }

// FindByBackend returns the devices whose backend identifier is id.
func FindByBackend(id string) ([]int, error) { return Sysfs{}.FindByBackend(id) }

// InUse reports whether device index is in use; see Sysfs.InUse.
func InUse(index int) (bool, error) { return Sysfs{}.InUse(index) }

// WaitReady waits until device index has wantSize bytes and its
// partitions are scanned; see Sysfs.WaitReady.
func WaitReady(ctx context.Context, index int, wantSize int64) error {
	return Sysfs{}.WaitReady(ctx, index, wantSize)
}
