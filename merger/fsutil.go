package merger

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// This file holds the small file-system primitives the durable parts of
// the package are built from. They follow one rule: data is synced before
// the metadata (directory entry, journal record, state file) that points
// at it.

// fdatasync is fsutil.Fdatasync.
var fdatasync = fsutil.Fdatasync

// mkdirAllSync creates dir (below the existing directory root) and its
// missing parents, fsyncing each parent whose entries it changed, so that
// a file renamed into dir later cannot vanish with a directory that was
// never made durable.
func mkdirAllSync(root, dir string) error {
	rel, err := filepath.Rel(root, dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return fmt.Errorf("merger: directory %s is not below %s", dir, root)
	}
	if rel == "." {
		return nil
	}
	parent := root
	for _, part := range strings.Split(rel, "/") {
		cur := filepath.Join(parent, part)
		err := os.Mkdir(cur, 0o755)
		switch {
		case err == nil:
			if err := fsutil.SyncDir(parent); err != nil {
				return err
			}
		case errors.Is(err, fs.ErrExist):
			st, serr := os.Stat(cur)
			if serr != nil {
				return serr
			}
			if !st.IsDir() {
				return fmt.Errorf("merger: %s exists and is not a directory: remove or rename it", cur)
			}
		default:
			return err
		}
		parent = cur
	}
	return nil
}

// fileID identifies an inode: a renamed file keeps it.
type fileID struct {
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
	Size int64  `json:"size"`
}

// statID returns the fileID of path (not following a final symlink).
func statID(path string) (fileID, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return fileID{}, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("merger: stat %s: no inode information", path)
	}
	return fileID{Dev: uint64(sys.Dev), Ino: sys.Ino, Size: st.Size()}, nil
}

// deviceOf returns the st_dev of path.
func deviceOf(path string) (uint64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("merger: stat %s: no device information", path)
	}
	return uint64(sys.Dev), nil
}

// freeSpace returns the bytes available to unprivileged users on the file
// system holding path.
func freeSpace(path string) (int64, error) {
	free, _, err := fsutil.DiskSpace(path)
	return free, err
}
