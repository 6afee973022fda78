//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// osBlockDevice is a block device opened with O_DIRECT.
type osBlockDevice struct {
	f *os.File
}

// openBlockDevice opens path with O_DIRECT (read-write, or read-only when
// write is false).
func openBlockDevice(path string, write bool) (blockDevice, error) {
	flag := unix.O_RDONLY
	if write {
		flag = unix.O_RDWR
	}
	fd, err := unix.Open(path, flag|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &osBlockDevice{f: os.NewFile(uintptr(fd), path)}, nil
}

func (d *osBlockDevice) ReadAt(p []byte, off int64) (int, error)  { return d.f.ReadAt(p, off) }
func (d *osBlockDevice) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }
func (d *osBlockDevice) Close() error                             { return d.f.Close() }

func (d *osBlockDevice) Size() (int64, error) {
	var size uint64
	if err := d.ioctl(unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil {
		return 0, err
	}
	return int64(size), nil
}

func (d *osBlockDevice) LogicalBlockSize() (int64, error) {
	var bs int32
	if err := d.ioctl(unix.BLKSSZGET, unsafe.Pointer(&bs)); err != nil {
		return 0, fmt.Errorf("BLKSSZGET: %w", err)
	}
	return int64(bs), nil
}

func (d *osBlockDevice) Sync() error {
	return unix.Fdatasync(int(d.f.Fd()))
}

// DropCache writes back and invalidates the device's page cache
// (BLKFLSBUF). BLKFLSBUF needs CAP_SYS_ADMIN; without it the clean pages
// are dropped with posix_fadvise(DONTNEED) instead.
func (d *osBlockDevice) DropCache() error {
	if err := d.Sync(); err != nil {
		return err
	}
	err := d.ioctl(unix.BLKFLSBUF, nil)
	if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
		err = unix.Fadvise(int(d.f.Fd()), 0, 0, unix.FADV_DONTNEED)
	}
	return err
}

func (d *osBlockDevice) ioctl(req uint, arg unsafe.Pointer) error {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(arg))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}
