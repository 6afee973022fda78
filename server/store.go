package server

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// maxComponentLength is the longest path component the loader accepts.
const maxComponentLength = 150

// ErrImageNotFound is returned when no file serves a requested name/rid.
var errImageNotFound = errors.New("server: image not found")

// ErrTooManyImages is returned when maxImages images are loaded and none
// of them may be unloaded to make room.
var errTooManyImages = errors.New("server: too many images loaded")

// StoreOptions configures a Store.
type storeOptions struct {
	BasePath      string // image root (absolute)
	VMDKLegacy    bool   // files without .r<rid> load as rid 1 under their full name
	RemoveMissing bool   // drop images whose file vanished on reload
	MaxImages     int    // most images loaded at once (0 = 5000)
	Logger        *slog.Logger
	// OnLoad, if set, is called for every image the store loads (after it
	// was registered), e.g. to queue its integrity checks.
	OnLoad func(*image)
}

type imageKey struct {
	name string
	rid  uint16
}

// Store is the set of loaded images below the base path. It scans the tree
// at start and on Reload, and loads files that appear later on first
// request.
//
// The table holds at most MaxImages images. When it is full, a load
// unloads the least recently used image that is idle and can be loaded
// again at any time: one loaded on demand or replicated from an uplink,
// with no client, no other reference (uplink, queued check), no unsaved
// or unsynced cache map and no failed hash block. So no sequence of
// requests can fill the table: requests only name files that exist (one
// canonical name each, protocol.ValidImageName), and those idle ones make
// room for the next.
type store struct {
	opts storeOptions
	log  *slog.Logger

	mu     sync.RWMutex
	images map[imageKey]*image
	nextID int

	dirMu sync.Mutex
	dirs  map[string]dirListing

	evictions atomic.Uint64 // images unloaded because maxImages was reached
}

// NewStore returns an empty store; call Reload to scan the base path.
func newStore(opts storeOptions) *store {
	if opts.MaxImages <= 0 {
		opts.MaxImages = 5000
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &store{opts: opts, log: opts.Logger, images: map[imageKey]*image{}}
}

// ParseImageFileName splits a path relative to the base path into image
// name and revision. ok is false for sidecars, hidden entries, long
// components and files without a valid .r<rid> suffix (unless legacy).
func parseImageFileName(rel string, legacy bool) (name string, rid uint16, ok bool, why string) {
	rel = filepath.ToSlash(rel)
	for _, c := range strings.Split(rel, "/") {
		if strings.HasPrefix(c, ".") {
			return "", 0, false, "hidden"
		}
		if len(c) > maxComponentLength {
			return "", 0, false, "path component longer than 150 bytes"
		}
	}
	for _, ext := range []string{".crc", ".map", ".meta"} {
		if strings.HasSuffix(rel, ext) {
			return "", 0, false, "sidecar"
		}
	}
	i := strings.LastIndex(rel, ".r")
	if i > 0 {
		n, err := strconv.ParseUint(rel[i+2:], 10, 16)
		if err == nil && n > 0 && !strings.ContainsAny(rel[i+2:], "+-") {
			name = rel[:i]
			if protocol.ValidImageName(name) {
				return name, uint16(n), true, ""
			}
			return "", 0, false, "invalid image name"
		}
	}
	if legacy && protocol.ValidImageName(rel) {
		return rel, 1, true, ""
	}
	return "", 0, false, "invalid revision ID (file name must end in .r<1..65535>)"
}

// Reload scans the base path: it adds new files, replaces images whose size
// or CRC list changed and, with RemoveMissing, drops images whose file
// vanished. It returns how many images were added, replaced and removed.
func (s *store) reload() (added, replaced, removed int, err error) {
	seen, err := s.scan()
	if err != nil {
		return 0, 0, 0, err
	}
	replaced, removed = s.reconcile(seen)
	added = s.loadNew(seen) - replaced
	return added, replaced, removed, nil
}

// foundFile is an image file found by a scan.
type foundFile struct {
	path string
	size int64
}

// scan walks the base path and returns the servable image files in it.
func (s *store) scan() (map[imageKey]foundFile, error) {
	seen := map[imageKey]foundFile{}
	base := s.opts.BasePath
	// WalkDir does not follow a symlinked root, nor (rightly, see
	// basepath.go) symlinked directories below it.
	root := base
	if r, err := filepath.EvalSymlinks(base); err == nil {
		root = r
	}
	walkErr := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			s.log.Warn("cannot scan", "path", path, "err", err)
			if d != nil && d.IsDir() && path != root {
				return fs.SkipDir
			}
			return nil
		}
		if path == root {
			return nil
		}
		if strings.HasPrefix(d.Name(), ".") || len(d.Name()) > maxComponentLength {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(root, path)
			s.scanFile(seen, rel)
		}
		return nil
	})
	if walkErr != nil {
		return nil, fmt.Errorf("scan %s: %w", base, walkErr)
	}
	return seen, nil
}

// scanFile adds the file at rel (relative to the base path) to seen if it
// is a servable image.
func (s *store) scanFile(seen map[imageKey]foundFile, rel string) {
	base := s.opts.BasePath
	path := filepath.Join(base, rel)
	name, rid, ok, why := parseImageFileName(rel, s.opts.VMDKLegacy)
	if !ok {
		if why != "sidecar" && why != "hidden" {
			s.log.Warn("ignoring file", "path", path, "reason", why)
		}
		return
	}
	st, err := servableFile(base, path)
	if errors.Is(err, errOutsideBase) {
		s.log.Warn("ignoring symlink that leads outside basePath", "path", path, "err", err)
	}
	if err == nil {
		seen[imageKey{name, rid}] = foundFile{path, st.Size()}
	}
}

// reconcile drops loaded images whose file changed (size or CRC list) or,
// with RemoveMissing, vanished, and runs the load-time checks of images
// whose CRC list appeared.
func (s *store) reconcile(seen map[imageKey]foundFile) (replaced, removed int) {
	s.mu.Lock()
	var drop, newCRC []*image
	for k, img := range s.images {
		f, ok := seen[k]
		if !ok {
			if s.opts.RemoveMissing {
				s.log.Info("image vanished, removing", "image", img.String(), "path", img.Path)
				delete(s.images, k)
				drop = append(drop, img)
				removed++
			}
			continue
		}
		same, added := f.size == img.RealSize, false
		if same {
			same, added = s.sameCRCList(img, f.path)
		}
		if added {
			newCRC = append(newCRC, img)
		}
		if !same {
			s.log.Warn("image changed on disk, replacing it (never change an image in place; use a new revision)",
				"image", img.String(), "oldSize", img.RealSize, "newSize", f.size)
			delete(s.images, k)
			drop = append(drop, img)
			replaced++
		}
	}
	s.mu.Unlock()
	for _, img := range drop {
		img.unref()
	}
	for _, img := range newCRC {
		if s.opts.OnLoad != nil {
			s.opts.OnLoad(img) // its load-time checks, now with a CRC list
		}
	}
	return replaced, removed
}

// loadNew loads the images in seen that are not loaded, in path order,
// and returns how many it loaded.
func (s *store) loadNew(seen map[imageKey]foundFile) (loaded int) {
	keys := make([]imageKey, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b imageKey) int {
		return strings.Compare(seen[a].path, seen[b].path)
	})
	for _, k := range keys {
		s.mu.RLock()
		_, ok := s.images[k]
		s.mu.RUnlock()
		if ok {
			continue
		}
		if _, err := s.load(k, seen[k].path, false); err != nil {
			s.log.Warn("cannot load image", "path", seen[k].path, "err", err)
			continue
		}
		loaded++
	}
	return loaded
}

// load opens a file and registers it; an image that is already loaded is
// returned instead. onDemand marks an image loaded for a request rather
// than by the scan: it may be unloaded again when idle and the table is
// full, and it is returned with a client reference taken (under the lock,
// so that no other load unloads it before its client uses it).
func (s *store) load(k imageKey, path string, onDemand bool) (*image, error) {
	img, err := openImage(path, k.name, k.rid)
	if err != nil {
		return nil, err
	}
	img.setCRCList(loadCRCFile(path, img.VirtualSize, s.log))
	img.loadSidecars(s.log)
	img.onDemand = onDemand
	s.mu.Lock()
	if old, ok := s.images[k]; ok {
		if onDemand {
			old.acquire() // registered images hold the store's reference: never fails
		}
		s.mu.Unlock()
		img.unref()
		return old, nil
	}
	var evicted *image
	if len(s.images) >= s.opts.MaxImages {
		evicted = s.evictLocked()
		if evicted == nil {
			s.mu.Unlock()
			img.unref()
			return nil, fmt.Errorf("%w (maxImages=%d) and none is idle: raise maxImages or wait for clients to leave", errTooManyImages, s.opts.MaxImages)
		}
	}
	s.nextID++
	img.ID = s.nextID
	s.images[k] = img
	if onDemand {
		img.acquire()
	}
	s.mu.Unlock()
	if evicted != nil {
		s.log.Info("unloaded idle image to make room (maxImages reached); it loads again on request",
			"id", evicted.ID, "image", evicted.String())
		evicted.unref()
	}
	s.log.Info("loaded image", "id", img.ID, "image", img.String(), "size", img.VirtualSize,
		"crc", img.crcList() != nil, "complete", img.complete(), "path", path)
	if s.opts.OnLoad != nil {
		s.opts.OnLoad(img)
	}
	return img, nil
}

// evictLocked removes the least recently used evictable image from the
// table and returns it (the caller drops the store's reference), or nil.
func (s *store) evictLocked() *image {
	var victim *image
	for _, img := range s.images {
		if img.evictable() && (victim == nil || img.atime.Load() < victim.atime.Load()) {
			victim = img
		}
	}
	if victim != nil {
		delete(s.images, imageKey{victim.Name, victim.RID})
		s.evictions.Add(1)
	}
	return victim
}

// Get returns image name/rid with a client reference taken; rid 0 selects
// the highest revision loaded or on disk. Files that appeared since the
// last scan are loaded on demand. The caller must call Release.
func (s *store) get(name string, rid uint16) (*image, error) {
	if !protocol.ValidImageName(name) {
		return nil, fmt.Errorf("%w: invalid name %q", errImageNotFound, name)
	}
	if rid == 0 {
		rid = s.latestRID(name)
		if rid == 0 {
			return nil, fmt.Errorf("%w: %s (no revision)", errImageNotFound, name)
		}
	}
	k := imageKey{name, rid}
	// The reference is taken under the lock: eviction and LRU deletion,
	// which check for clients under the write lock, then never unload an
	// image a client is about to use. (A registered image holds the
	// store's reference, so acquire cannot fail here.)
	s.mu.RLock()
	img := s.images[k]
	if img != nil && !img.acquire() {
		img = nil
	}
	s.mu.RUnlock()
	if img == nil {
		path, err := s.onDemandPath(name, rid)
		if err != nil {
			return nil, fmt.Errorf("%w: %s:%d: %w", errImageNotFound, name, rid, err)
		}
		if img, err = s.load(k, path, true); err != nil {
			return nil, err
		}
	}
	img.touch()
	return img, nil
}

// onDemandPath returns the file of image name/rid if the scan would have
// loaded it: a name the scan derives from that file (no hidden or overlong
// component), no symlinked directory on the way, a non-empty regular file
// or a symlink to one inside basePath (basepath.go).
func (s *store) onDemandPath(name string, rid uint16) (string, error) {
	rel := name + ".r" + strconv.Itoa(int(rid))
	if n, r, ok, why := parseImageFileName(rel, false); !ok || n != name || r != rid {
		return "", fmt.Errorf("server: file %s would not be loaded by the scan (%s)", rel, why)
	}
	if err := checkDirs(s.opts.BasePath, rel); err != nil {
		return "", err
	}
	path := imageFilePath(s.opts.BasePath, name, rid)
	if _, err := servableFile(s.opts.BasePath, path); err != nil {
		return "", err
	}
	return path, nil
}

// imageFilePath returns the file of image name/rid below basePath.
func imageFilePath(basePath, name string, rid uint16) string {
	return filepath.Join(basePath, filepath.FromSlash(name)+".r"+strconv.Itoa(int(rid)))
}

// Release drops the reference Get took.
func (s *store) Release(img *image) { img.release() }

// latestRID returns the highest revision of name loaded or on disk, 0 if none.
func (s *store) latestRID(name string) uint16 {
	return s.latestRIDBelow(name, math.MaxUint16+1)
}

// latestRIDBelow returns the highest revision of name below the given one
// that is loaded or on disk, 0 if none.
func (s *store) latestRIDBelow(name string, below int) uint16 {
	var best uint16
	s.mu.RLock()
	for k := range s.images {
		if k.name == name && k.rid > best && int(k.rid) < below {
			best = k.rid
		}
	}
	s.mu.RUnlock()
	if checkDirs(s.opts.BasePath, name) != nil {
		return best
	}
	dir := filepath.Join(s.opts.BasePath, filepath.Dir(filepath.FromSlash(name)))
	base := filepath.Base(name) + ".r"
	for _, entry := range s.dirEntries(dir) {
		n, ok := strings.CutPrefix(entry, base)
		if !ok {
			continue
		}
		rid, err := strconv.ParseUint(n, 10, 16)
		if err != nil || rid == 0 || strings.ContainsAny(n, "+-") || uint16(rid) <= best || int(rid) >= below {
			continue
		}
		if _, err := servableFile(s.opts.BasePath, filepath.Join(dir, entry)); err == nil {
			best = uint16(rid)
		}
	}
	return best
}

// dirEntries lists a directory's entry names, cached until the directory's
// mtime changes: rid-0 requests then cost one stat(2), not a directory read.
func (s *store) dirEntries(dir string) []string {
	st, err := os.Stat(dir)
	if err != nil {
		return nil
	}
	s.dirMu.Lock()
	defer s.dirMu.Unlock()
	if c, ok := s.dirs[dir]; ok && c.mtime.Equal(st.ModTime()) {
		return c.names
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	// A listing of a directory changed within the last second may miss an
	// entry created later in the same timestamp tick: not cached.
	if time.Since(st.ModTime()) < time.Second {
		return names
	}
	if s.dirs == nil || len(s.dirs) > 4096 {
		s.dirs = map[string]dirListing{}
	}
	s.dirs[dir] = dirListing{mtime: st.ModTime(), names: names}
	return names
}

// dirListing is a cached directory listing.
type dirListing struct {
	mtime time.Time
	names []string
}

// List returns the loaded images ordered by id.
func (s *store) list() []*image {
	s.mu.RLock()
	out := make([]*image, 0, len(s.images))
	for _, img := range s.images {
		out = append(out, img)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b *image) int { return a.ID - b.ID })
	return out
}

// ByID returns the loaded image with the given id, or nil.
func (s *store) byID(id int) *image {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, img := range s.images {
		if img.ID == id {
			return img
		}
	}
	return nil
}

// Remove drops img from the store if it is still registered and has no
// users (LRU deletion). It reports whether it did.
func (s *store) remove(img *image) bool {
	k := imageKey{img.Name, img.RID}
	s.mu.Lock()
	if s.images[k] != img || img.Users() > 0 {
		s.mu.Unlock()
		return false
	}
	delete(s.images, k)
	s.mu.Unlock()
	img.unref()
	return true
}

// Loaded returns the loaded image name/rid without taking a reference, or
// nil.
func (s *store) loaded(name string, rid uint16) *image {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.images[imageKey{name, rid}]
}

// Close drops every image; files close when their last client leaves.
func (s *store) Close() {
	s.mu.Lock()
	imgs := s.images
	s.images = map[imageKey]*image{}
	s.mu.Unlock()
	for _, img := range imgs {
		img.unref()
	}
}
