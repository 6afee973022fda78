package server

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// loadCRCFile reads the `.crc` sidecar of an image file. A missing file
// gives nil; a file that is too short, has the wrong number of entries or a
// bad master CRC is ignored with a warning, like the reference does.
func loadCRCFile(imagePath string, virtualSize int64, log *slog.Logger) []uint32 {
	b, err := os.ReadFile(imagePath + ".crc")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		log.Warn("cannot read CRC list", "path", imagePath+".crc", "err", err)
		return nil
	}
	list, err := protocol.ParseCRCList(b)
	if err != nil {
		log.Warn("ignoring CRC list", "path", imagePath+".crc", "err", err)
		return nil
	}
	if want := protocol.HashBlockCount(virtualSize); len(list) != want {
		log.Warn("ignoring CRC list: wrong number of hash blocks", "path", imagePath+".crc",
			"entries", len(list), "want", want)
		return nil
	}
	return list
}

// sameCRCList reports whether the `.crc` of the image file at path (of
// img's size) holds img's CRC list. A list that appeared since img was
// loaded from this same file (`dnbd3-server --crc` run later) is no
// change: img takes it, and added reports that.
func (s *store) sameCRCList(img *image, path string) (same, added bool) {
	list := loadCRCFile(path, img.VirtualSize, s.log)
	if slices.Equal(list, img.crcList()) {
		return true, false
	}
	if img.crcList() != nil || list == nil || !img.isFile(path) {
		return false, false
	}
	img.setCRCList(list)
	s.log.Info("CRC list added to a loaded image", "image", img.String(), "path", path+".crc")
	return true, true
}

// WriteCRCFile computes the CRC list of an image file and writes it to
// `<path>.crc`, refusing to overwrite an existing file (the one-shot
// `dnbd3-server --crc FILE`).
func WriteCRCFile(path string) ([]uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() == 0 {
		return nil, fmt.Errorf("server: %s: not a non-empty regular file", path)
	}
	list, err := protocol.ComputeCRCList(f, st.Size())
	if err != nil {
		return nil, err
	}
	return list, writeFileExclusive(path+".crc", protocol.MarshalCRCList(list))
}

// writeFileExclusive creates path with data and syncs it; it fails if the
// file exists. A partial file is removed on error.
func writeFileExclusive(path string, data []byte) error {
	err := fsutil.WriteFileSync(path, data, os.O_EXCL, 0o644)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("server: %s already exists; remove it first if you want to recreate it", path)
	}
	return err
}
