package server

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"golang.org/x/sys/unix"
)

// createImageFile creates the image file path with size bytes,
// preallocated unless sparse, through a hidden temporary file that is
// synced and renamed into place without replacing anything: a server
// scanning the directory never sees a partial file, and an image that
// appeared meanwhile is never overwritten (fsutil.ErrDestExists). With
// ignoreAllocErrors a failed preallocation is returned as allocErr and the
// file stays sparse.
func createImageFile(path string, size int64, sparse, ignoreAllocErrors bool) (allocErr, err error) {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".part")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	fail := func(err error) (error, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		return fail(fmt.Errorf("size %s: %w", tmp, err))
	}
	if !sparse {
		if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
			if !ignoreAllocErrors {
				return fail(fmt.Errorf("preallocate %d bytes for %s: %w (set ignoreAllocErrors=true or sparseFiles=true to allow sparse files)", size, path, err))
			}
			allocErr = err
		}
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return nil, err
	}
	if err := fsutil.RenameNoReplace(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("rename %s: %w", tmp, err)
	}
	return allocErr, fsutil.SyncDir(filepath.Dir(path))
}
