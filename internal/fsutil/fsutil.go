// Package fsutil holds the durable file operations the server, the COW
// overlay and the merger share: an atomic replace of a small file, a
// rename that never replaces, and the fsync of a directory that makes
// renames and unlinks in it durable.
package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// SyncDir fsyncs a directory, making the creation, removal and renaming
// of its entries durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// WriteFileAtomic replaces path with data so that a crash leaves either
// the old or the new content, never a mix: it writes path+".tmp", fsyncs
// it, renames it over path and fsyncs the directory.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return SyncDir(filepath.Dir(path))
}

// ErrDestExists is returned by RenameNoReplace when newpath exists.
var ErrDestExists = errors.New("destination exists")

// RenameNoReplace renames oldpath to newpath atomically, failing with
// ErrDestExists instead of replacing an existing newpath. It uses
// renameat2(RENAME_NOREPLACE); on file systems without it, link(2) +
// unlink(2), which is just as exclusive (a crash in between leaves both
// names for the same complete inode).
func RenameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST):
		return ErrDestExists
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EOPNOTSUPP):
		if err := os.Link(oldpath, newpath); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return ErrDestExists
			}
			return err
		}
		return os.Remove(oldpath)
	default:
		return &os.LinkError{Op: "renameat2", Old: oldpath, New: newpath, Err: err}
	}
}
