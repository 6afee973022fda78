package server

// Which files below the base path may be served. One rule for the scan,
// on-demand loading, rid-0 lookups and the proxy's local copies: nothing
// outside basePath is ever served or written.
//
//   - Directories are never followed through symlinks: the scan does not
//     descend into a symlinked directory, and a requested name whose path
//     goes through one is not found (a proxy does not create a copy there).
//   - A symlinked image file is served if its target, with every link
//     resolved, lies inside basePath (itself resolved); one that leads
//     outside is ignored.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// errOutsideBase is returned for paths that leave the base path.
var errOutsideBase = errors.New("server: leads outside basePath")

// resolvesInside checks that path, with every symlink resolved, lies
// inside base (also resolved).
func resolvesInside(base, path string) error {
	realBase, err := filepath.EvalSymlinks(base)
	if err != nil {
		return err
	}
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(realBase, target)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return fmt.Errorf("symlink %s resolves to %s: %w", path, target, errOutsideBase)
	}
	return nil
}

// checkDirs checks the directories of rel (slash-separated, relative to
// base) that exist: each must be a real directory, not a symlink. Missing
// ones are fine (the caller finds no file or creates them).
func checkDirs(base, rel string) error {
	parts := strings.Split(rel, "/")
	dir := base
	for _, c := range parts[:len(parts)-1] {
		dir = filepath.Join(dir, c)
		st, err := os.Lstat(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if st.Mode()&fs.ModeSymlink != 0 {
			return fmt.Errorf("%s is a symlinked directory, which is not followed: %w", dir, errOutsideBase)
		}
		if !st.IsDir() {
			return fmt.Errorf("server: %s is not a directory", dir)
		}
	}
	return nil
}

// servableFile stats path, a candidate image file below base (whose
// directories were checked): it must be a non-empty regular file, or a
// symlink to one inside base.
func servableFile(base, path string) (fs.FileInfo, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		if err := resolvesInside(base, path); err != nil {
			return nil, err
		}
		if st, err = os.Stat(path); err != nil {
			return nil, err
		}
	}
	if !st.Mode().IsRegular() || st.Size() == 0 {
		return nil, fmt.Errorf("server: %s is not a non-empty regular file", path)
	}
	return st, nil
}
