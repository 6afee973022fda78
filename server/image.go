package server

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Problem bits of an image, as the RPC's "problems" field reports them.
const (
	ProblemRead         = 1  // the image file cannot be read
	ProblemWrite        = 2  // the local copy cannot be written (proxy)
	ProblemChanged      = 4  // the file changed size on disk
	ProblemNoUplink     = 8  // incomplete and no uplink (proxy)
	ProblemUplinkQueued = 16 // the uplink queue is full (proxy)
)

// Image is one loaded revision of an image file `<name>.r<rid>` below the
// base path. Its file stays open while the image is loaded; connections
// hold a reference through Acquire/Release so that a replaced or removed
// image is closed only after its last client left.
type Image struct {
	ID          int    // per-process id, shown by the RPC
	Name        string // image name (relative path without the .r<rid> suffix)
	RID         uint16 // revision
	Path        string // absolute path of the file
	WWN         uint64 // World Wide Name derived from the name
	RealSize    int64  // file size in bytes
	VirtualSize int64  // RealSize rounded up to 4 KiB: what clients see

	file *os.File
	fd   int

	crcMu sync.RWMutex
	crc   []uint32 // per-16-MiB CRC list from the .crc sidecar, nil if none

	users    atomic.Int32 // connected clients
	refs     atomic.Int32 // users plus the store's own reference
	atime    atomic.Int64 // unix seconds of the last access
	problems atomic.Uint32
	closeMu  sync.Mutex
	closed   bool
}

// openImage opens path as image name/rid and loads its .crc sidecar.
func openImage(path, name string, rid uint16) (*Image, error) {
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
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if st.Size() == 0 {
		f.Close()
		return nil, fmt.Errorf("%s is empty", path)
	}
	img := &Image{
		Name:        name,
		RID:         rid,
		Path:        path,
		WWN:         WWN(name),
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
func (img *Image) String() string { return fmt.Sprintf("%s:%d", img.Name, img.RID) }

// File returns the open image file.
func (img *Image) File() *os.File { return img.file }

// CRCList returns the image's CRC list, or nil if it has none.
func (img *Image) CRCList() []uint32 {
	img.crcMu.RLock()
	defer img.crcMu.RUnlock()
	return img.crc
}

func (img *Image) setCRCList(list []uint32) {
	img.crcMu.Lock()
	img.crc = list
	img.crcMu.Unlock()
}

// Users returns the number of connected clients.
func (img *Image) Users() int { return int(img.users.Load()) }

// Problems returns the problem bits (ProblemRead, ...).
func (img *Image) Problems() uint32 { return img.problems.Load() }

// Touch records an access now.
func (img *Image) Touch() {
	now := time.Now().Unix()
	if img.atime.Load() != now {
		img.atime.Store(now)
	}
}

// Idle returns the time since the last access.
func (img *Image) Idle() time.Duration {
	return time.Since(time.Unix(img.atime.Load(), 0))
}

// Complete returns the percentage of the image present locally (100 for
// images served from a complete file).
func (img *Image) Complete() int { return 100 }

// acquire takes a client reference. It fails if the image was closed.
func (img *Image) acquire() bool {
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
func (img *Image) release() {
	img.users.Add(-1)
	img.unref()
}

// unref drops a reference and closes the file with the last one.
func (img *Image) unref() {
	if img.refs.Add(-1) == 0 {
		img.closeMu.Lock()
		defer img.closeMu.Unlock()
		if !img.closed {
			img.closed = true
			img.file.Close()
		}
	}
}

// CacheMap returns the cache map the RPC's /cachemap shows: the single byte
// 0xFF for a complete image.
func (img *Image) CacheMap() []byte { return []byte{0xFF} }
