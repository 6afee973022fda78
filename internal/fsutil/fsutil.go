// Package fsutil holds the file operations the server, the COW overlay,
// the uploader and the merger share: a synced write of a small file and
// an atomic replace of one, a rename that never replaces, fdatasync, the
// fsync of a directory that makes renames and unlinks in it durable, the
// free space of a file system, and copies of file ranges (copy.go).
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
	if err := replaceFile(path, data, perm, true); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// ReplaceFile replaces path with data through path+".tmp" and a rename,
// so readers never see a torn or mixed file, but syncs nothing: for files
// that only report state (a status file), whose loss on power failure is
// harmless.
func ReplaceFile(path string, data []byte, perm fs.FileMode) error {
	return replaceFile(path, data, perm, false)
}

func replaceFile(path string, data []byte, perm fs.FileMode, sync bool) error {
	tmp := path + ".tmp"
	err := writeFile(tmp, data, os.O_TRUNC, perm, sync)
	if err == nil {
		err = os.Rename(tmp, path)
		if err != nil {
			os.Remove(tmp)
		}
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// WriteFileSync writes data to path, opened with
// os.O_WRONLY|os.O_CREATE|flag (flag adds os.O_TRUNC or os.O_EXCL), fsyncs
// and closes it. Without os.O_EXCL a file that existed is given perm. A
// file it opened is removed if a later step fails; with os.O_EXCL an
// existing path is an error satisfying errors.Is(err, fs.ErrExist).
func WriteFileSync(path string, data []byte, flag int, perm fs.FileMode) error {
	return writeFile(path, data, flag, perm, true)
}

// writeFile is WriteFileSync, syncing only if sync.
func writeFile(path string, data []byte, flag int, perm fs.FileMode, sync bool) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|flag, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && flag&os.O_EXCL == 0 {
		err = f.Chmod(perm) // a file that existed kept its mode
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// Fdatasync flushes f's data and the metadata needed to read it back (its
// size), but not its timestamps. It retries EINTR; any other error is
// returned as it is, never retried (after a failed fdatasync the kernel
// may already have dropped the dirty pages).
func Fdatasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for {
			serr = unix.Fdatasync(int(fd))
			if serr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}

// DiskSpace returns the bytes available to unprivileged users and the
// total size of the file system holding path.
func DiskSpace(path string) (free, total int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, 0, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	return int64(st.Bavail) * int64(st.Bsize), int64(st.Blocks) * int64(st.Bsize), nil
}

// ErrDestExists is returned by RenameNoReplace when newpath exists.
var ErrDestExists = errors.New("fsutil: destination exists")

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
