package merger

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// Installing a merged revision takes two renames, in this order:
//
//  1. <temp>.crc -> <dest>.crc (replacing a stale list of a revision that
//     does not exist), then the destination directory is fsynced;
//  2. <temp> -> <dest>, never replacing anything.
//
// So the list is durable before the revision can be seen: a server never
// loads the revision without it. Both happen under Manager.installMu
// after checking that <dest> does not exist, so a merge that lost the
// race for the revision never touches the winner's list. The crash states
// between and around the renames are completed by recovery.go.

// install moves the result of a finalized merge into place. It fails
// with fsutil.ErrDestExists if the revision exists (a conflict); a list
// it placed for it is then removed again.
func (m *Manager) install(fin *finalizeRecord, uuid string) error {
	m.installMu.Lock()
	defer m.installMu.Unlock()
	if _, err := os.Lstat(fin.Dest); err == nil {
		// A crash after the first rename may have left our list beside
		// the revision someone else made since.
		removeCRCIf(fin.Dest, fin.CRC)
		return fsutil.ErrDestExists
	}
	placed, err := placeCRC(fin.Temp, fin, true)
	if err != nil {
		return err
	}
	if err := m.callHook(hookCRCPlaced, uuid); err != nil {
		return err
	}
	err = fsutil.RenameNoReplace(fin.Temp, fin.Dest)
	if errors.Is(err, fsutil.ErrDestExists) {
		// Another process made the revision between the check and the
		// rename: its image must not keep our list.
		removeCRCIf(fin.Dest, placed)
	}
	return err
}

// placeCRC makes <fin.Dest>.crc the CRC list of the image file at image:
// nothing to do if the recorded list is there; else the recorded
// temporary list is renamed into place; else (it was lost, or the record
// predates CRC lists) the list is computed from the image. With replace
// false an existing list is kept. It returns the identity of the list in
// place (nil for an empty image, which has none).
func placeCRC(image string, fin *finalizeRecord, replace bool) (*fileID, error) {
	if fin.ID.Size == 0 {
		return nil, nil
	}
	dst := fin.Dest + crcSuffix
	cur, curErr := statID(dst)
	if fin.CRC != nil && curErr == nil && cur == *fin.CRC {
		return &cur, nil
	}
	if curErr == nil && !replace {
		return &cur, nil
	}
	tmp := fin.Temp + crcSuffix
	if id, err := statID(tmp); fin.CRC == nil || err != nil || id != *fin.CRC {
		// Lost: compute it again from the synced image.
		if err := computeCRCFile(image, tmp); err != nil {
			return nil, err
		}
	}
	id, err := statID(tmp)
	if err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return nil, fmt.Errorf("move the CRC list into place: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dst)); err != nil {
		return nil, err
	}
	return &id, nil
}

// computeCRCFile writes the CRC list of every hash block of image to
// path, synced.
func computeCRCFile(image, path string) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	list, err := newHoleCRC(f, st.Size()).all()
	if err != nil {
		return fmt.Errorf("compute the CRC list of %s: %w", image, err)
	}
	return fsutil.WriteFileSync(path, protocol.MarshalCRCList(list), os.O_TRUNC, 0o644)
}

// removeCRCIf removes <dest>.crc if it is the file id names.
func removeCRCIf(dest string, id *fileID) {
	if id == nil {
		return
	}
	if cur, err := statID(dest + crcSuffix); err == nil && cur == *id {
		if err := os.Remove(dest + crcSuffix); err == nil || errors.Is(err, fs.ErrNotExist) {
			fsutil.SyncDir(filepath.Dir(dest))
		}
	}
}
