package fsutil

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Copy methods CopyRange reports.
const (
	CopyReflink   = "reflink"         // FICLONERANGE: the files share the blocks
	CopyFileRange = "copy_file_range" // copied in the kernel
	CopyStream    = "stream"          // read and written through a buffer
)

// CopyRange copies the n bytes at offset off of src to the same offset
// of dst: as a reflink (FICLONERANGE) where the file system can share
// blocks (btrfs, XFS; off and n aligned to its block size), else with
// copy_file_range(2), else through a buffer. It returns the method used.
// A src that ends before off+n is io.ErrUnexpectedEOF.
func CopyRange(dst, src *os.File, off, n int64) (string, error) {
	if n <= 0 {
		return CopyStream, nil
	}
	err := withFds(dst, src, func(dfd, sfd int) error {
		return unix.IoctlFileCloneRange(dfd, &unix.FileCloneRange{Src_fd: int64(sfd), Src_offset: uint64(off), Src_length: uint64(n), Dest_offset: uint64(off)})
	})
	if err == nil {
		return CopyReflink, nil
	}
	copied, err := CopyFileRangeAt(dst, src, off, n)
	switch {
	case err == nil:
		return CopyFileRange, nil
	case copied == 0 && CopyUnsupported(err):
		return CopyStream, CopyBuffered(dst, src, off, n, false)
	}
	return CopyFileRange, err
}

// CopyFileRangeAt copies up to n bytes at off of src to the same offset
// of dst with copy_file_range(2) and returns how many it copied; a src
// that ends first is io.ErrUnexpectedEOF.
func CopyFileRangeAt(dst, src *os.File, off, n int64) (int64, error) {
	var copied int64
	err := withFds(dst, src, func(dfd, sfd int) error {
		roff, woff := off, off
		for copied < n {
			c, err := unix.CopyFileRange(sfd, &roff, dfd, &woff, int(min(n-copied, 1<<30)), 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if c == 0 {
				return fmt.Errorf("copy_file_range from %s at offset %d: %w", src.Name(), roff, io.ErrUnexpectedEOF)
			}
			copied += int64(c)
		}
		return nil
	})
	return copied, err
}

// CloneFile makes dst share all of src's blocks (FICLONE, a reflink of
// the whole file), where the file system supports it.
func CloneFile(dst, src *os.File) error {
	return withFds(dst, src, func(dfd, sfd int) error { return unix.IoctlFileClone(dfd, sfd) })
}

// CopyUnsupported reports whether copy_file_range failed because it
// cannot be used for this pair of files at all (then copy through a
// buffer).
func CopyUnsupported(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EXDEV) ||
		errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
}

// CopyBuffered copies the n bytes at offset off of src to the same offset
// of dst through a buffer in user space; a src that ends first is
// io.ErrUnexpectedEOF. With skipZeros, pieces that are all zero are not
// written, so they stay holes in a dst that was extended with Truncate
// (and read as zeros).
func CopyBuffered(dst, src *os.File, off, n int64, skipZeros bool) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		p := buf[:min(n, int64(len(buf)))]
		if _, err := src.ReadAt(p, off); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read %s at %d: %w", src.Name(), off, err)
		}
		if !skipZeros || !allZero(p) {
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
