package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// target is one file or block device under test. A regular file is used
// with pread/pwrite, fstat and ftruncate, exactly as the reference does. A
// block device (a dnbd3go COW device /dev/nbdN) gets its size from
// BLKGETSIZE64 and is resized through "dnbd3-nbd resize"; see
// deviceTarget.
type target interface {
	// Name is the path, for messages.
	Name() string
	// ReadAt and WriteAt follow io.ReaderAt and io.WriterAt. A regular
	// file grows when written past its end; a device does not.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the current size as the kernel shows it.
	Size() (int64, error)
	// Resize sets the size to n (a file is truncated; a device's COW
	// session gets exactly n bytes and the device shows VisibleSize(n)).
	// If resizing is not possible at all, the error is a
	// *resizeUnavailableError, and the steps that need a resize are
	// skipped.
	Resize(ctx context.Context, n int64) error
	// CheckResize returns nil if the target can be resized, else a
	// *resizeUnavailableError. It does not change the target.
	CheckResize(ctx context.Context) error
	// VisibleSize is the size the target shows after Resize(n): n for a
	// file, n rounded down to the logical block size for a device.
	VisibleSize(n int64) int64
	// BlockSize is the granularity of VisibleSize: 1 for a file, the
	// logical block size for a device.
	BlockSize() int64
	// IsDevice reports whether the target is a block device.
	IsDevice() bool
	// Sync makes written data durable.
	Sync() error
	// Close releases the target.
	Close() error
}

// resizeUnavailableError means a target cannot be resized at all (the
// resize command is missing, or the device is not a dnbd3go COW device).
// The steps that need a resize are then skipped, not failed.
type resizeUnavailableError struct {
	name   string
	reason error
}

func (e *resizeUnavailableError) Error() string {
	return fmt.Sprintf("cannot resize %s: %v", e.name, e.reason)
}

func (e *resizeUnavailableError) Unwrap() error { return e.reason }

// fileTarget is a regular file.
type fileTarget struct {
	f *os.File
}

func (t *fileTarget) Name() string                             { return t.f.Name() }
func (t *fileTarget) ReadAt(p []byte, off int64) (int, error)  { return t.f.ReadAt(p, off) }
func (t *fileTarget) WriteAt(p []byte, off int64) (int, error) { return t.f.WriteAt(p, off) }
func (t *fileTarget) VisibleSize(n int64) int64                { return n }
func (t *fileTarget) BlockSize() int64                         { return 1 }
func (t *fileTarget) IsDevice() bool                           { return false }
func (t *fileTarget) CheckResize(context.Context) error        { return nil }
func (t *fileTarget) Sync() error                              { return t.f.Sync() }
func (t *fileTarget) Close() error                             { return t.f.Close() }

func (t *fileTarget) Size() (int64, error) {
	fi, err := t.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", t.Name(), err)
	}
	return fi.Size(), nil
}

func (t *fileTarget) Resize(_ context.Context, n int64) error {
	if err := t.f.Truncate(n); err != nil {
		return fmt.Errorf("truncate %s to %d: %w", t.Name(), n, err)
	}
	return nil
}

// isBlockDevice is the default device test: a block (not character)
// device node.
func isBlockDevice(_ string, fi fs.FileInfo) bool {
	m := fi.Mode()
	return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0
}

// open opens path for the test: a block device as a deviceTarget that
// resizes with nbdCmd, a regular file as a fileTarget.
func (e *env) open(path string, write bool, nbdCmd string) (target, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if e.isDevice(path, fi) {
		dev, err := e.openDevice(path, write)
		if err != nil {
			return nil, fmt.Errorf("open block device %s: %w", path, err)
		}
		t, err := newDeviceTarget(path, dev, commandResizer{cmd: nbdCmd})
		if err != nil {
			dev.Close()
			return nil, err
		}
		return t, nil
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is neither a regular file nor a block device (%v)", path, fi.Mode().Type())
	}
	f, err := openFile(path, write)
	if err != nil {
		return nil, err
	}
	return &fileTarget{f: f}, nil
}

// openFile opens an existing file read-write, or read-only when write is
// false.
func openFile(path string, write bool) (*os.File, error) {
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	return os.OpenFile(path, flag, 0)
}

// resizeOrder returns a and b in the order they are resized: a device
// before a regular file, so that a device that cannot be resized fails
// before the file was changed.
func resizeOrder(a, b target) []target {
	if b.IsDevice() && !a.IsDevice() {
		return []target{b, a}
	}
	return []target{a, b}
}

// readFull reads exactly len(p) bytes at off.
func readFull(t target, p []byte, off int64) error {
	n, err := t.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		size, _ := t.Size()
		return fmt.Errorf("read %d bytes at %d from %s: short read of %d bytes (size is %d)", len(p), off, t.Name(), n, size)
	}
	return fmt.Errorf("read %d bytes at %d from %s: %w", len(p), off, t.Name(), err)
}

// writeFull writes all of p at off.
func writeFull(t target, p []byte, off int64) error {
	n, err := t.WriteAt(p, off)
	if err != nil {
		return fmt.Errorf("write %d bytes at %d to %s: %w", len(p), off, t.Name(), err)
	}
	if n != len(p) {
		return fmt.Errorf("write %d bytes at %d to %s: short write of %d bytes", len(p), off, t.Name(), n)
	}
	return nil
}
