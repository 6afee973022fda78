package server

// Disk space for new local copies: before a proxy creates one it makes
// sure the base path has room for it (its size + 10 MiB; 2 GiB with
// sparse files, which grow later). If not, it deletes the least recently
// used replicated image that has no users and no uplink and, unless files
// are sparse, was not accessed for 24 hours, but only after the server
// has been up for autoFreeDiskSpaceDelay (-1: never delete). Only images
// this or another proxy replicated (those with a `.map` or `.meta`) are
// ever deleted; their last access time comes from the `.meta`. An image
// a newer revision is being replicated from (reuse.go: pinned while that
// revision is cloned and while its uplink runs) is never deleted.

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// Disk space rules.
const (
	diskSpaceReserve = 10 << 20 // added to the image size
	sparseDiskSpace  = 2 << 30  // needed for a sparse copy
	lruMinAge        = 24 * time.Hour
	maxLRUDeletions  = 50 // per new copy
)

// errNoSpace means there is not enough disk space for a new local copy.
var errNoSpace = errors.New("server: not enough disk space")

// freeSpace returns the bytes available to the server below basePath.
func (p *proxy) freeSpace() (int64, error) {
	if f := p.s.hooks.freeSpace; f != nil {
		return f()
	}
	free, _, err := fsutil.DiskSpace(p.cfg().BasePath)
	return free, err
}

// ensureDiskSpace makes room for a local copy of size bytes.
func (p *proxy) ensureDiskSpace(size int64, sparse bool) error {
	need := size + diskSpaceReserve
	if sparse {
		need = sparseDiskSpace
	}
	cfg := p.cfg()
	for range maxLRUDeletions {
		free, err := p.freeSpace()
		if err != nil {
			return err
		}
		if free >= need {
			return nil
		}
		switch {
		case cfg.AutoFreeDiskSpaceDelay < 0:
			return fmt.Errorf("%w: %d bytes free, %d needed (autoFreeDiskSpaceDelay=-1: no automatic deletion)", errNoSpace, free, need)
		case time.Since(p.s.started) < cfg.AutoFreeDiskSpaceDelay:
			return fmt.Errorf("%w: %d bytes free, %d needed (old images are deleted only after %v of uptime, autoFreeDiskSpaceDelay)", errNoSpace, free, need, cfg.AutoFreeDiskSpaceDelay)
		}
		if !p.deleteLRU(sparse) {
			return fmt.Errorf("%w: %d bytes free, %d needed, and no unused replicated image old enough to delete", errNoSpace, free, need)
		}
	}
	return fmt.Errorf("%w: still short after deleting %d images", errNoSpace, maxLRUDeletions)
}

// deleteLRU deletes the least recently used deletable image; false if
// there is none. A reuse source cannot be pinned meanwhile.
func (p *proxy) deleteLRU(sparse bool) bool {
	p.pinMu.Lock()
	defer p.pinMu.Unlock()
	victim := p.lruVictim(sparse)
	if victim == nil {
		return false
	}
	p.deleteImage(victim)
	return true
}

// lruVictim returns the least recently used deletable image, or nil.
func (p *proxy) lruVictim(sparse bool) *image {
	minAge := lruMinAge
	if p.s.hooks.lruMinAge > 0 {
		minAge = p.s.hooks.lruMinAge
	}
	var victim *image
	for _, img := range p.s.store.list() {
		if !img.replica.Load() || img.Users() > 0 || img.up.Load() != nil || img.reusePins.Load() > 0 {
			continue
		}
		if !sparse && img.idle() < minAge {
			continue
		}
		if victim == nil || img.atime.Load() < victim.atime.Load() {
			victim = img
		}
	}
	return victim
}

// deleteImage unloads img and deletes its file and sidecars.
func (p *proxy) deleteImage(img *image) {
	if !p.s.store.remove(img) {
		return
	}
	p.s.met.lruDeletes.Add(1)
	p.log.Info("deleting least recently used replicated image to free disk space", "image", img.String(),
		"lastAccess", time.Unix(img.atime.Load(), 0).UTC().Format(time.RFC3339), "size", img.VirtualSize)
	for _, suffix := range []string{".map", ".crc", ".meta", ""} {
		if err := os.Remove(img.Path + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			p.log.Warn("cannot delete", "path", img.Path+suffix, "err", err)
		}
	}
}
