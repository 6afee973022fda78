package server

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Problem bits of an image, as the RPC's "problems" field reports them.
const (
	problemRead         = 1  // the image file cannot be read
	problemWrite        = 2  // the local copy cannot be written (proxy)
	problemChanged      = 4  // the file changed size on disk
	problemNoUplink     = 8  // incomplete and no uplink (proxy)
	problemUplinkQueued = 16 // the uplink queue is full (proxy)
)

// Image is one loaded revision of an image file `<name>.r<rid>` below the
// base path. Its file stays open while the image is loaded; connections
// hold a reference through Acquire/Release so that a replaced or removed
// image is closed only after its last client left.
type image struct {
	ID          int    // per-process id, shown by the RPC
	Name        string // image name (relative path without the .r<rid> suffix)
	RID         uint16 // revision
	Path        string // absolute path of the file
	WWN         uint64 // World Wide Name derived from the name
	RealSize    int64  // file size in bytes
	VirtualSize int64  // RealSize rounded up to 4 KiB: what clients see

	file     *os.File
	fd       int
	noNowait atomic.Bool // preadv2(RWF_NOWAIT) is not supported for file
	onDemand bool        // loaded for a request, not by the scan (set before registering)

	crcMu sync.RWMutex
	crc   []uint32 // per-16-MiB CRC list from the .crc sidecar, nil if none

	users    atomic.Int32 // connected clients
	refs     atomic.Int32 // users plus the store's own reference plus uplinks and checks
	atime    atomic.Int64 // unix seconds of the last access
	problems atomic.Uint32
	closeMu  sync.Mutex
	closed   bool

	// Incomplete (replicated) images. The request loop's fast path looks
	// at cache and hasBad only: both nil/false means "serve from the file".

	cache   atomic.Pointer[cacheMap] // present blocks; nil: the file is complete
	replica atomic.Bool              // replicated from an uplink: keeps a .meta, LRU candidate
	saveMu  sync.Mutex               // serialises .map saves and completion

	wmu     sync.Mutex
	wfile   *os.File              // write handle of the local copy, opened on first use
	syncErr atomic.Pointer[error] // set for good when a sync of the copy or its map failed

	hasBad atomic.Bool // some hash blocks failed their CRC check
	badMu  sync.Mutex
	bad    map[int]bool // failed hash blocks whose reads are refused
	fixes  map[int]int  // how often each hash block was fetched again

	up        atomic.Pointer[uplink] // the proxy's uplink for this image, if any
	upMu      sync.Mutex             // serialises uplink creation
	upFailed  atomic.Int64           // unix nanoseconds of the last failed uplink start
	bytesRecv atomic.Uint64          // bytes received from uplinks

	bytesReused atomic.Uint64 // bytes copied from a previous revision instead (reuse.go)
	reusePins   atomic.Int32  // newer revisions replicated from this one: not deleted (lru.go)
}

// openImage opens path as image name/rid and loads its .crc sidecar.
func openImage(path, name string, rid uint16) (*image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("server: %s is not a regular file", path)
	}
	if st.Size() == 0 {
		f.Close()
		return nil, fmt.Errorf("server: %s is empty", path)
	}
	img := &image{
		Name:        name,
		RID:         rid,
		Path:        path,
		WWN:         wwn(name),
		RealSize:    st.Size(),
		VirtualSize: protocol.VirtualSize(st.Size()),
		file:        f,
		fd:          int(f.Fd()),
	}
	img.refs.Store(1)
	img.atime.Store(st.ModTime().Unix())
	return img, nil
}

// String names the image as name:rid.
func (img *image) String() string { return fmt.Sprintf("%s:%d", img.Name, img.RID) }

// LogValue formats the image for log/slog (name:rid) only if the record is
// logged: pass img, not img.String(), on hot paths.
func (img *image) LogValue() slog.Value { return slog.StringValue(img.String()) }

// isFile reports whether path names the file img has open (not one that
// replaced it).
func (img *image) isFile(path string) bool {
	st, err := os.Stat(path)
	if err != nil {
		return false
	}
	open, err := img.file.Stat()
	return err == nil && os.SameFile(st, open)
}

// CRCList returns the image's CRC list, or nil if it has none.
func (img *image) crcList() []uint32 {
	img.crcMu.RLock()
	defer img.crcMu.RUnlock()
	return img.crc
}

func (img *image) setCRCList(list []uint32) {
	img.crcMu.Lock()
	img.crc = list
	img.crcMu.Unlock()
}

// Users returns the number of connected clients.
func (img *image) Users() int { return int(img.users.Load()) }

// Problems returns the problem bits (ProblemRead, ...). The uplink bits
// are computed: an incomplete image without a connected uplink has
// ProblemNoUplink, one whose uplink queue is congested ProblemUplinkQueued.
func (img *image) Problems() uint32 {
	p := img.problems.Load()
	if img.syncFailed() != nil {
		p |= problemWrite
	}
	if img.cache.Load() != nil {
		up := img.up.Load()
		switch {
		case up == nil || !up.connected():
			p |= problemNoUplink
		case up.congested():
			p |= problemUplinkQueued
		}
	}
	return p
}

// Touch records an access now.
func (img *image) touch() {
	now := time.Now().Unix()
	if img.atime.Load() != now {
		img.atime.Store(now)
	}
}

// Idle returns the time since the last access.
func (img *image) idle() time.Duration {
	return time.Since(time.Unix(img.atime.Load(), 0))
}

// Complete returns the percentage of the image present locally (100 for
// images served from a complete file).
func (img *image) complete() int {
	if cm := img.cache.Load(); cm != nil {
		return cm.percent()
	}
	return 100
}

// Incomplete reports whether some blocks of the image are not in the
// local file yet.
func (img *image) incomplete() bool { return img.cache.Load() != nil }

// loadSidecars reads the `.map` (incomplete image) and `.meta` (last
// access time of a replicated image) sidecars. An unreadable `.map`
// counts as all blocks missing: the data is fetched again rather than
// trusted.
func (img *image) loadSidecars(log *slog.Logger) {
	if cm, err := loadCacheMap(img.Path+".map", img.VirtualSize); !errors.Is(err, os.ErrNotExist) {
		if err != nil {
			log.Warn("cannot read cache map, treating every block as missing", "image", img.String(), "err", err)
			cm = newCacheMap(img.VirtualSize)
		}
		img.replica.Store(true)
		if !cm.complete() {
			img.cache.Store(cm)
		}
	}
	if t, err := readMetaFile(img.Path); !errors.Is(err, os.ErrNotExist) {
		img.replica.Store(true)
		if err == nil {
			img.atime.Store(t.Unix())
		}
	}
}

// evictable reports whether the store may unload the image to make room:
// it was loaded on demand or replicated (so it loads again from its files
// when requested), and nothing but the store holds it: no client, no
// uplink, no queued check, no cache map changes that are not on disk, no
// failed hash block (which only the in-memory state remembers) and no
// failed sync (which stays visible in the RPC until a restart).
func (img *image) evictable() bool {
	if !img.onDemand && !img.replica.Load() {
		return false
	}
	if img.users.Load() != 0 || img.refs.Load() != 1 || img.up.Load() != nil || img.hasBad.Load() || img.syncFailed() != nil {
		return false
	}
	if cm := img.cache.Load(); cm != nil {
		if _, dirty := cm.unsaved(); dirty {
			return false
		}
	}
	return true
}

// errImageClosed is returned for images whose file was closed.
var errImageClosed = errors.New("server: image closed")

// SyncFailed returns the error of a failed sync of the local copy or its
// cache map, or nil. Such a failure is permanent until the image is loaded
// again (a restart): the kernel may have dropped the unsynced data, so
// nothing is written to the copy any more.
func (img *image) syncFailed() error {
	if e := img.syncErr.Load(); e != nil {
		return *e
	}
	return nil
}

// errSyncFailed wraps SyncFailed's error for writes that are refused.
var errSyncFailed = errors.New("server: local copy not written since a sync failed (restart the server once the disk is fixed)")

// writer returns the write handle of the local copy, opening it on first
// use. A failure sets ProblemWrite. After a failed sync it always fails.
func (img *image) writer() (*os.File, error) {
	if err := img.syncFailed(); err != nil {
		return nil, fmt.Errorf("%w: %w", errSyncFailed, err)
	}
	img.wmu.Lock()
	defer img.wmu.Unlock()
	if img.wfile != nil {
		return img.wfile, nil
	}
	img.closeMu.Lock()
	closed := img.closed
	img.closeMu.Unlock()
	if closed {
		return nil, errImageClosed
	}
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		img.problems.Or(problemWrite)
		return nil, fmt.Errorf("open %s for writing: %w", img.Path, err)
	}
	img.wfile = f
	return f, nil
}

// ref takes a reference that keeps the file open (uplinks, queued
// checks). It fails if the image was closed.
func (img *image) ref() bool {
	for {
		r := img.refs.Load()
		if r <= 0 {
			return false
		}
		if img.refs.CompareAndSwap(r, r+1) {
			return true
		}
	}
}

// markBad records a hash block that failed its check; reads touching it
// are refused until it passes again.
func (img *image) markBad(hb int) {
	img.badMu.Lock()
	defer img.badMu.Unlock()
	if img.bad == nil {
		img.bad = map[int]bool{}
	}
	img.bad[hb] = true
	img.hasBad.Store(true)
}

// countRepair counts an attempt to repair hash block hb and returns the
// number of attempts so far.
func (img *image) countRepair(hb int) int {
	img.badMu.Lock()
	defer img.badMu.Unlock()
	if img.fixes == nil {
		img.fixes = map[int]int{}
	}
	img.fixes[hb]++
	return img.fixes[hb]
}

// markGood forgets a failed hash block that passed its check.
func (img *image) markGood(hb int) {
	img.badMu.Lock()
	defer img.badMu.Unlock()
	delete(img.bad, hb)
	img.hasBad.Store(len(img.bad) > 0)
}

// touchesBad reports whether [start, end) overlaps a failed hash block.
func (img *image) touchesBad(start, end int64) bool {
	img.badMu.Lock()
	defer img.badMu.Unlock()
	for hb := range img.bad {
		hs := int64(hb) * protocol.HashBlockSize
		if start < hs+protocol.HashBlockSize && end > hs {
			return true
		}
	}
	return false
}

// Where a read of an image range comes from (image.locate).
type readSource uint8

const (
	inFile    readSource = iota // the range is in the file
	inBad                       // it touches a hash block that failed its check: refused
	notInFile                   // blocks of it are absent from an incomplete copy
)

// locate says where a read of [start, end) comes from. DNBD3 GET_BLOCK,
// NBD READ and iSCSI reads decide alike.
func (img *image) locate(start, end int64) readSource {
	if img.hasBad.Load() && img.touchesBad(start, end) {
		return inBad
	}
	if cm := img.cache.Load(); cm != nil && !cm.has(start, end) {
		return notInFile
	}
	return inFile
}

// acquire takes a client reference. It fails if the image was closed.
func (img *image) acquire() bool {
	for {
		r := img.refs.Load()
		if r <= 0 {
			return false
		}
		if img.refs.CompareAndSwap(r, r+1) {
			img.users.Add(1)
			return true
		}
	}
}

// release drops a client reference.
func (img *image) release() {
	img.users.Add(-1)
	img.unref()
}

// unref drops a reference and closes the file with the last one.
func (img *image) unref() {
	if img.refs.Add(-1) == 0 {
		img.closeMu.Lock()
		wasClosed := img.closed
		img.closed = true
		if !wasClosed {
			img.file.Close()
		}
		img.closeMu.Unlock()
		// writer takes wmu, then closeMu: never both in the other order
		img.wmu.Lock()
		if img.wfile != nil {
			img.wfile.Close()
			img.wfile = nil
		}
		img.wmu.Unlock()
	}
}

// CacheMap returns the cache map the RPC's /cachemap shows: the live map
// of an incomplete image, the single byte 0xFF for a complete one.
func (img *image) cacheMap() []byte {
	if cm := img.cache.Load(); cm != nil {
		return cm.bytes()
	}
	return []byte{0xFF}
}
