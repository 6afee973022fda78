package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/protocol"
	"golang.org/x/sys/unix"
)

// CreateImage creates an empty image `<basePath>/<name>.r<rid>` of size
// bytes rounded up to 4 KiB, preallocated unless sparse, plus an all-zero
// `.map` cache map (the one-shot `dnbd3-server --create`). If
// preallocation fails and ignoreAllocErrors is set, the file stays sparse.
func CreateImage(basePath, name string, rid uint16, size int64, sparse, ignoreAllocErrors bool) (string, error) {
	if !protocol.ValidImageName(name) {
		return "", fmt.Errorf("invalid image name %q: it must not be empty, start with '/' or '.', end with '/' or contain \"/.\"", name)
	}
	if rid == 0 {
		return "", errors.New("revision must be between 1 and 65535")
	}
	if size <= 0 {
		return "", errors.New("size must be positive")
	}
	size = protocol.VirtualSize(size)
	path := imageFilePath(basePath, name, rid)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("%s already exists", path)
		}
		return "", err
	}
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(path)
		return "", err
	}
	if err := f.Truncate(size); err != nil {
		return fail(err)
	}
	if !sparse {
		if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil && !ignoreAllocErrors {
			return fail(fmt.Errorf("preallocate %d bytes for %s: %w (set ignoreAllocErrors=true or sparseFiles=true to allow sparse files)", size, path, err))
		}
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fail(err)
	}
	if err := writeFileExclusive(path+".map", make([]byte, mapLen(size))); err != nil {
		os.Remove(path)
		return "", err
	}
	return path, nil
}
