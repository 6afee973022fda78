package merger

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

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
				if err != nil && first && method == CopyAuto && rangeUnsupported(err) {
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
		return errors.New("only a whole file can be cloned")
	}
	return withFds(dst, src, func(dfd, sfd int) error { return unix.IoctlFileClone(dfd, sfd) })
}

// rangeUnsupported reports whether copy_file_range failed because it
// cannot be used for this pair of files at all.
func rangeUnsupported(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EXDEV) ||
		errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
}

// copyRange copies up to n bytes at off with copy_file_range and returns
// how many it copied.
func copyRange(dst, src *os.File, off, n int64) (int64, error) {
	var copied int64
	err := withFds(dst, src, func(dfd, sfd int) error {
		roff, woff := off, off
		for copied < n {
			c, err := unix.CopyFileRange(sfd, &roff, dfd, &woff, int(n-copied), 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if c == 0 {
				return fmt.Errorf("at offset %d: %w (the original image shrank during the merge)", roff, io.ErrUnexpectedEOF)
			}
			copied += int64(c)
		}
		return nil
	})
	return copied, err
}

// copyStream copies n bytes at off through a buffer, leaving all-zero
// pieces as holes (dst was extended with Truncate, so they read as 0).
func copyStream(dst, src *os.File, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		p := buf[:min(n, int64(len(buf)))]
		if _, err := src.ReadAt(p, off); err != nil {
			if err == io.EOF {
				err = fmt.Errorf("at offset %d: %w (the original image shrank during the merge)", off, io.ErrUnexpectedEOF)
			}
			return fmt.Errorf("read %s: %w", src.Name(), err)
		}
		if !allZero(p) {
			if _, err := dst.WriteAt(p, off); err != nil {
				return err
			}
		}
		off += int64(len(p))
		n -= int64(len(p))
	}
	return nil
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
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

// withFds runs fn with the descriptors of a and b.
func withFds(a, b *os.File, fn func(afd, bfd int) error) error {
	ac, err := a.SyscallConn()
	if err != nil {
		return err
	}
	bc, err := b.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	cerr := ac.Control(func(afd uintptr) {
		if err := bc.Control(func(bfd uintptr) { ferr = fn(int(afd), int(bfd)) }); err != nil {
			ferr = err
		}
	})
	if cerr != nil {
		return cerr
	}
	return ferr
}
