package merger

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"golang.org/x/sys/unix"
)

// CopyMethod selects how a merge copies the original image into the new
// revision's file.
type CopyMethod string

// Copy methods. Every method leaves the ranges that are holes in the
// original as holes in the copy (found with SEEK_DATA/SEEK_HOLE), so
// sparse images stay sparse.
const (
	// CopyAuto clones the file (FICLONE) when the whole original is
	// copied and the file system supports reflinks (btrfs, XFS), else uses
	// copy_file_range, else reads and writes.
	CopyAuto CopyMethod = ""
	// CopyClone only clones (FICLONE); the merge fails where that is not
	// possible (another file system, or a shrinking merge).
	CopyClone CopyMethod = "clone"
	// CopyRange only uses copy_file_range(2).
	CopyRange CopyMethod = "copy_file_range"
	// CopyStream reads and writes through a buffer in user space.
	CopyStream CopyMethod = "stream"
)

func (c CopyMethod) valid() bool {
	switch c {
	case CopyAuto, CopyClone, CopyRange, CopyStream:
		return true
	}
	return false
}

// copyChunk bounds one copy_file_range call or streamed read, so that a
// cancelled merge stops soon.
const copyChunk = 64 << 20

// copyOriginal copies the first n bytes of src into the empty file dst
// and returns the method it used. whole says that n is src's size (only
// then may it clone).
func copyOriginal(ctx context.Context, dst, src *os.File, n int64, whole bool, method CopyMethod) (CopyMethod, error) {
	if n == 0 {
		return CopyStream, nil
	}
	if method == CopyAuto || method == CopyClone {
		err := cloneFile(dst, src, whole)
		if err == nil {
			return CopyClone, nil
		}
		if method == CopyClone {
			return CopyClone, fmt.Errorf("clone (FICLONE): %w; use another copy method", err)
		}
	}
	if err := dst.Truncate(n); err != nil {
		return method, err
	}
	used := method
	if used == CopyAuto {
		used = CopyRange
	}
	first := true
	err := forDataSegments(src, n, func(off, end int64) error {
		for off < end {
			if err := ctx.Err(); err != nil {
				return err
			}
			chunk := min(end-off, copyChunk)
			if used == CopyRange {
				c, err := copyRange(dst, src, off, chunk)
				if err != nil && first && method == CopyAuto && fsutil.CopyUnsupported(err) {
					used = CopyStream // e.g. across file systems of different types
					continue
				}
				first = false
				if err != nil {
					return fmt.Errorf("copy_file_range from %s: %w", src.Name(), err)
				}
				off += c
				continue
			}
			if err := copyStream(dst, src, off, chunk); err != nil {
				return err
			}
			off += chunk
		}
		return nil
	})
	return used, err
}

// cloneFile makes dst share src's blocks (a reflink).
func cloneFile(dst, src *os.File, whole bool) error {
	if !whole {
		return errors.New("merger: only a whole file can be cloned")
	}
	return fsutil.CloneFile(dst, src)
}

// copyRange copies up to n bytes at off with copy_file_range and returns
// how many it copied.
func copyRange(dst, src *os.File, off, n int64) (int64, error) {
	c, err := fsutil.CopyFileRangeAt(dst, src, off, n)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = fmt.Errorf("%w (the original image shrank during the merge)", err)
	}
	return c, err
}

// copyStream copies n bytes at off through a buffer, leaving all-zero
// pieces as holes (dst was extended with Truncate, so they read as 0).
func copyStream(dst, src *os.File, off, n int64) error {
	err := fsutil.CopyBuffered(dst, src, off, n, true)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = fmt.Errorf("%w (the original image shrank during the merge)", err)
	}
	return err
}

// forDataSegments calls fn for each range of [0, n) of f that may hold
// data (not a hole), ascending. Where SEEK_DATA is not supported the
// whole range is one segment.
func forDataSegments(f *os.File, n int64, fn func(off, end int64) error) error {
	for off := int64(0); off < n; {
		// Moving f's offset is harmless: the copy reads with explicit
		// offsets (pread, copy_file_range).
		data, err := f.Seek(off, unix.SEEK_DATA)
		var hole int64
		if err == nil {
			hole, err = f.Seek(data, unix.SEEK_HOLE)
		}
		switch {
		case errors.Is(err, unix.ENXIO):
			return nil // only a hole remains
		case err != nil:
			return fn(off, n)
		case data >= n:
			return nil
		}
		end := min(hole, n)
		if err := fn(data, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}
