package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

// blockDevice is the raw device under a deviceTarget: I/O with offsets and
// lengths that are multiples of the logical block size, into buffers
// aligned for O_DIRECT. The real one (blockdev_linux.go) is an O_DIRECT
// file descriptor with ioctls; tests use a fake on a regular file.
type blockDevice interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the device size in bytes (BLKGETSIZE64).
	Size() (int64, error)
	// LogicalBlockSize is the device's logical block size (BLKSSZGET).
	LogicalBlockSize() (int64, error)
	// Sync flushes written data to the device (fdatasync).
	Sync() error
	// DropCache drops the kernel's page cache of the device (BLKFLSBUF),
	// so no other opener's stale pages survive a resize.
	DropCache() error
	Close() error
}

// resizer changes the size of a COW device.
type resizer interface {
	// Resize sets the COW session's size of dev to exactly size; the
	// device then shows size rounded down to its logical block size.
	Resize(ctx context.Context, dev string, size int64) error
	// Check reports whether dev can be resized, without changing it.
	Check(ctx context.Context, dev string) error
}

// commandResizer runs "CMD resize DEVICE SIZE" (and "CMD resize DEVICE"
// as the check), where CMD is --nbd-cmd (default dnbd3-nbd on PATH).
type commandResizer struct {
	cmd string
}

func (r commandResizer) Resize(ctx context.Context, dev string, size int64) error {
	return r.run(ctx, "resize", dev, strconv.FormatInt(size, 10))
}

func (r commandResizer) Check(ctx context.Context, dev string) error {
	return r.run(ctx, "resize", dev)
}

func (r commandResizer) run(ctx context.Context, args ...string) error {
	if r.cmd == "" {
		return errors.New("no resize command (--nbd-cmd is empty)")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	c := exec.CommandContext(ctx, r.path(), args...)
	c.Stdout = &out
	c.Stderr = &out
	if err := c.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
			msg = strings.TrimSpace(msg[i+1:])
		}
		if msg != "" {
			return fmt.Errorf("%s %s: %w: %s", r.cmd, strings.Join(args, " "), err, msg)
		}
		return fmt.Errorf("%s %s: %w", r.cmd, strings.Join(args, " "), err)
	}
	return nil
}

// path resolves the command: a bare name is looked up on PATH and, failing
// that, next to this executable (bin/dnbd3-cowtest finds bin/dnbd3-nbd).
func (r commandResizer) path() string {
	if strings.ContainsRune(r.cmd, '/') {
		return r.cmd
	}
	if _, err := exec.LookPath(r.cmd); err == nil {
		return r.cmd
	}
	if self, err := os.Executable(); err == nil {
		sibling := filepath.Join(filepath.Dir(self), r.cmd)
		if fi, err := os.Stat(sibling); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return sibling
		}
	}
	return r.cmd
}

// bounceSize is the size of a deviceTarget's aligned bounce buffer: the
// largest single request it sends to the device.
const bounceSize = 4 << 20

// resizeSettle is how long a deviceTarget waits for the kernel to show the
// new size after the resize command returned.
const resizeSettle = 10 * time.Second

// deviceTarget is a block device under test, normally /dev/nbdN attached by
// "dnbd3-nbd attach -c" (a dnbd3go COW device).
//
// Caching: all I/O goes through an O_DIRECT descriptor, so every read
// reaches the NBD backend (the COW overlay) and nothing can come from a
// stale page cache after a resize. Requests are aligned to the logical block
// size through a bounce buffer; a write that starts or ends inside a block
// reads that block first (read-modify-write, as the kernel's page cache
// would do for a buffered write) — unless it is the block this target
// wrote last, whose content it keeps (the page cache would not read back a
// page it just wrote either). That halves the reads of a sequential
// unaligned writer such as writeLongNonAlignedPattern; every written byte
// is still read back from the device by the sub-tests' checks. Around each resize the target also
// flushes and drops the device's page cache (fdatasync + BLKFLSBUF), for
// pages other openers (udev, blkid) may have cached.
//
// Size: BLKGETSIZE64. Resize: the resizer (dnbd3-nbd resize DEVICE SIZE)
// sets the COW session's size to exactly SIZE; the device then shows SIZE
// rounded down to the logical block size, and the bytes between are not
// reachable through the device.
type deviceTarget struct {
	path string
	dev  blockDevice
	rs   resizer
	bs   int64  // logical block size
	size int64  // device size in bytes, as of the last Size or Resize
	buf  []byte // bounce buffer, aligned to 4096 and a multiple of bs

	resized  bool  // a resize succeeded: later failures are real failures
	noResize error // the first resize failed: resizing is unavailable

	// last is the content of the block at lastOff, the last block of the
	// last successful write (lastOff < 0: none known). Resizes forget it.
	last    []byte
	lastOff int64
}

// newDeviceTarget wraps an open block device.
func newDeviceTarget(path string, dev blockDevice, rs resizer) (*deviceTarget, error) {
	bs, err := dev.LogicalBlockSize()
	if err != nil {
		return nil, fmt.Errorf("logical block size of %s: %w", path, err)
	}
	if bs < 1 || bs > bounceSize/4 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("%s: unsupported logical block size %d", path, bs)
	}
	t := &deviceTarget{path: path, dev: dev, rs: rs, bs: bs, buf: alignedBuffer(bounceSize), last: make([]byte, bs), lastOff: -1}
	if _, err := t.Size(); err != nil {
		return nil, err
	}
	return t, nil
}

// alignedBuffer returns n bytes starting at a 4096-byte boundary, as
// O_DIRECT needs. (Go's heap does not move objects.)
func alignedBuffer(n int) []byte {
	const align = 4096
	b := make([]byte, n+align)
	skip := int(-uintptr(unsafe.Pointer(&b[0])) & (align - 1))
	return b[skip : skip+n : skip+n]
}

func (t *deviceTarget) Name() string              { return t.path }
func (t *deviceTarget) IsDevice() bool            { return true }
func (t *deviceTarget) BlockSize() int64          { return t.bs }
func (t *deviceTarget) VisibleSize(n int64) int64 { return roundDown(n, t.bs) }
func (t *deviceTarget) Close() error              { return t.dev.Close() }

func (t *deviceTarget) Sync() error {
	if err := t.dev.Sync(); err != nil {
		return fmt.Errorf("fdatasync %s: %w", t.path, err)
	}
	return nil
}

func (t *deviceTarget) Size() (int64, error) {
	n, err := t.dev.Size()
	if err != nil {
		return 0, fmt.Errorf("size of %s (BLKGETSIZE64): %w", t.path, err)
	}
	t.size = n
	return n, nil
}

// ioSize is the part of the device that whole-block I/O can reach.
func (t *deviceTarget) ioSize() int64 { return roundDown(t.size, t.bs) }

func (t *deviceTarget) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	end := t.ioSize()
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= end {
			return n, io.EOF
		}
		want := min(int64(len(p)-n), end-pos)
		a := roundDown(pos, t.bs)
		e := min(roundUp(pos+want, t.bs), a+int64(len(t.buf)))
		m, err := t.dev.ReadAt(t.buf[:e-a], a)
		if int64(m) < e-a {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return n, fmt.Errorf("read %d bytes at %d: %w", e-a, a, err)
		}
		n += copy(p[n:n+int(min(want, e-pos))], t.buf[pos-a:e-a])
	}
	return n, nil
}

func (t *deviceTarget) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if end := t.ioSize(); off+int64(len(p)) > end {
		return 0, fmt.Errorf("write [%d, %d) ends past the end of the device (%d bytes): a block device does not grow by writing", off, off+int64(len(p)), end)
	}
	maxPiece := len(t.buf) - 2*int(t.bs)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		piece := min(len(p)-n, maxPiece)
		stop := pos + int64(piece)
		a, e := roundDown(pos, t.bs), roundUp(stop, t.bs)
		if a != pos {
			if err := t.readBlock(t.buf[:t.bs], a); err != nil {
				return n, err
			}
		}
		if e != stop && (e-t.bs != a || a == pos) {
			if err := t.readBlock(t.buf[e-t.bs-a:e-a], e-t.bs); err != nil {
				return n, err
			}
		}
		copy(t.buf[pos-a:], p[n:n+piece])
		t.lastOff = -1
		m, err := t.dev.WriteAt(t.buf[:e-a], a)
		if err != nil {
			return n, fmt.Errorf("write %d bytes at %d: %w", e-a, a, err)
		}
		if int64(m) != e-a {
			return n, fmt.Errorf("write %d bytes at %d: short write of %d bytes", e-a, a, m)
		}
		copy(t.last, t.buf[e-a-t.bs:e-a])
		t.lastOff = e - t.bs
		n += piece
	}
	return n, nil
}

// readBlock reads one whole block (the head or tail of an unaligned write),
// from the device or, if this target wrote it last, from its copy.
func (t *deviceTarget) readBlock(b []byte, off int64) error {
	if off == t.lastOff {
		copy(b, t.last)
		return nil
	}
	m, err := t.dev.ReadAt(b, off)
	if m == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read-modify-write: read block at %d: %w", off, err)
}

func (t *deviceTarget) CheckResize(ctx context.Context) error {
	switch {
	case t.resized:
		return nil
	case t.noResize != nil:
		return t.noResize
	}
	if err := t.rs.Check(ctx, t.path); err != nil {
		t.noResize = &resizeUnavailableError{name: t.path, reason: err}
		return t.noResize
	}
	return nil
}

func (t *deviceTarget) Resize(ctx context.Context, n int64) error {
	if t.noResize != nil {
		return t.noResize
	}
	if n < 0 {
		return fmt.Errorf("resize %s to %d: negative size", t.path, n)
	}
	t.lastOff = -1 // the block may be cut off or read as zeros now
	// Nothing of ours is in flight or dirty (O_DIRECT, synchronous), but
	// flush anyway: the backend must not see requests during a resize.
	if err := t.Sync(); err != nil {
		return err
	}
	if err := t.rs.Resize(ctx, t.path, n); err != nil {
		if !t.resized {
			t.noResize = &resizeUnavailableError{name: t.path, reason: err}
			return t.noResize
		}
		return fmt.Errorf("resize %s to %d: %w", t.path, n, err)
	}
	t.resized = true
	want := t.VisibleSize(n)
	deadline := time.Now().Add(resizeSettle)
	for {
		got, err := t.Size()
		if err != nil {
			return err
		}
		if got == want {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("resize %s to %d: the device shows %d bytes, want %d (%d rounded down to the logical block size %d)", t.path, n, got, want, n, t.bs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := t.dev.DropCache(); err != nil {
		return fmt.Errorf("drop page cache of %s after resize: %w", t.path, err)
	}
	return nil
}
