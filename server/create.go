package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// CreateImage creates an empty image `<basePath>/<name>.r<rid>` of size
// bytes rounded up to 4 KiB, preallocated unless sparse, plus an all-zero
// `.map` cache map (the one-shot `dnbd3-server --create`). If
// preallocation fails and ignoreAllocErrors is set, the file stays sparse.
func CreateImage(basePath, name string, rid uint16, size int64, sparse, ignoreAllocErrors bool) (string, error) {
	if !protocol.ValidImageName(name) {
		return "", fmt.Errorf("server: invalid image name %q: it must not be empty, start with '/' or '.', end with '/' or contain \"/.\" or \"//\"", name)
	}
	if err := checkDirs(basePath, name); err != nil {
		return "", fmt.Errorf("%w: the server would not serve the image there", err)
	}
	if rid == 0 {
		return "", errors.New("server: revision must be between 1 and 65535")
	}
	if size <= 0 {
		return "", errors.New("server: size must be positive")
	}
	size = protocol.VirtualSize(size)
	path := imageFilePath(basePath, name, rid)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	exists := fmt.Errorf("server: %s already exists", path)
	if _, err := os.Lstat(path); err == nil {
		return "", exists
	}
	// The `.map` comes first and the image file last, complete, under its
	// final name: a server watching basePath never sees the new image
	// without its map (it would serve it as a complete image of zeros).
	if err := writeFileExclusive(path+".map", make([]byte, mapLen(size))); err != nil {
		return "", err
	}
	if _, err := createImageFile(path, size, sparse, ignoreAllocErrors); err != nil {
		os.Remove(path + ".map")
		if errors.Is(err, fsutil.ErrDestExists) {
			return "", exists
		}
		return "", err
	}
	return path, nil
}
