package cowstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Remote is the read-only image below the overlay (a *client.Image).
type Remote interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}

// Options configure Create and Load.
type Options struct {
	// Remote is the image the session is based on.
	Remote Remote
	// ImageName and RID identify it; they are checked on Load.
	ImageName string
	RID       uint16
	// CommitInterval is how often unflushed metadata is committed in the
	// background (default 1 s; negative disables). Flush always commits.
	CommitInterval time.Duration
	// Logger receives the overlay's logs.
	Logger *slog.Logger
	// Now returns the time (tests); default time.Now.
	Now func() time.Time

	// wrapFile, if set, wraps the meta and data files (tests: fault
	// injection, write recording).
	wrapFile func(name string, f storeFile) storeFile
}

// table is one L2 table in memory.
type table struct {
	index   int32 // position in the meta file
	entries [cowformat.L2Entries]entry
}

// Overlay is a copy-on-write session: reads merge local blocks with the
// remote image, writes go to the session directory. It implements
// nbdbridge.Backend (plus FUA, zero-write and resize) and upload.Source.
type Overlay struct {
	dir    string
	opts   Options
	log    *slog.Logger
	remote Remote
	meta   storeFile
	data   storeFile

	// sizeMu: writers and readers hold it shared; resizes hold it
	// exclusively, so the sizes never change under a request.
	sizeMu    sync.RWMutex
	imageSize atomic.Int64
	validSize atomic.Int64

	// allocMu guards table creation and slot allocation.
	allocMu    sync.Mutex
	tables     [cowformat.L1Entries]atomic.Pointer[table]
	nextL2     int32
	nextSlot   int64
	tableSaved [cowformat.L1Entries]bool // table written to meta at least once (commitMu)

	// what Load ignored: tables and slots handed out by a commit that
	// never wrote its header (an interrupted commit)
	ignoredTables, ignoredEntries int

	// clusterMu: one lock per cluster shard guards entries and their blocks.
	clusterMu [512]sync.RWMutex

	// dirty metadata, waiting for the next commit
	dirtyMu   sync.Mutex
	dirty     map[int]struct{} // absolute cluster indexes
	newTables map[int]struct{} // L1 indexes of tables never committed
	l1Dirty   bool             // L1 must be rewritten (new session, repaired load)
	headDirty bool

	hdrMu     sync.Mutex // uuid, imageName, creationTime
	uuid      string
	imageName string // as in the header: cut to 199 bytes
	created   uint64
	fullName  string // the image's whole name (sidecar "name")

	lock *os.File // flock'd lock file of the session directory

	commitMu    sync.Mutex
	savedHeader []byte // the header as last committed (commitMu)
	failure     atomic.Pointer[error]
	genSeq      atomic.Uint64
	closed      atomic.Bool
	stop        context.CancelFunc
	bgDone      chan struct{}
}

// ErrClosed is returned after Close.
var ErrClosed = errors.New("cowstore: session closed")

func (o *Overlay) now() time.Time {
	if o.opts.Now != nil {
		return o.opts.Now()
	}
	return time.Now()
}

func (o *Overlay) lockFor(cluster int) *sync.RWMutex { return &o.clusterMu[cluster%len(o.clusterMu)] }

// lookup returns the entry of an absolute cluster index, or nil if its
// L2 table does not exist.
func (o *Overlay) lookup(cluster int) *entry {
	t := o.tables[cluster/cowformat.L2Entries].Load()
	if t == nil {
		return nil
	}
	return &t.entries[cluster%cowformat.L2Entries]
}

// entryFor returns the cluster's entry, creating its L2 table if needed.
func (o *Overlay) entryFor(cluster int) *entry {
	l1 := cluster / cowformat.L2Entries
	if t := o.tables[l1].Load(); t != nil {
		return &t.entries[cluster%cowformat.L2Entries]
	}
	o.allocMu.Lock()
	t := o.tables[l1].Load()
	if t == nil {
		t = &table{index: o.nextL2}
		o.nextL2++
		for i := range t.entries {
			t.entries[i].offset = -1
		}
		o.tables[l1].Store(t)
		o.dirtyMu.Lock()
		o.newTables[l1] = struct{}{}
		o.headDirty = true
		o.dirtyMu.Unlock()
	}
	o.allocMu.Unlock()
	return &t.entries[cluster%cowformat.L2Entries]
}

// allocSlot gives the entry a data slot; the caller holds its cluster lock.
func (o *Overlay) allocSlot(e *entry) {
	if e.offset >= 0 {
		return
	}
	o.allocMu.Lock()
	e.offset = o.nextSlot
	o.nextSlot += cowformat.ClusterSize
	o.allocMu.Unlock()
}

// touch records a modification of cluster; the caller holds its lock.
func (o *Overlay) touch(cluster int, e *entry) {
	e.timeChanged = o.now().Unix()
	e.gen = o.genSeq.Add(1)
	o.markDirty(cluster)
}

func (o *Overlay) markDirty(cluster int) {
	o.dirtyMu.Lock()
	o.dirty[cluster] = struct{}{}
	o.dirtyMu.Unlock()
}

func (o *Overlay) markHeader() {
	o.dirtyMu.Lock()
	o.headDirty = true
	o.dirtyMu.Unlock()
}

// Size returns the current image size.
func (o *Overlay) Size() int64 { return o.imageSize.Load() }

// ValidRemoteSize returns how much of the remote image is still valid.
func (o *Overlay) ValidRemoteSize() int64 { return o.validSize.Load() }

// Dir returns the session directory.
func (o *Overlay) Dir() string { return o.dir }

// ImageName returns the full name of the image the session is based on
// (the meta header keeps only its first 199 bytes).
func (o *Overlay) ImageName() string { return o.fullName }

// RID returns the revision the session is based on.
func (o *Overlay) RID() uint16 { return o.opts.RID }

// UUID returns the merger session id stored in the header ("" if none).
func (o *Overlay) UUID() string {
	o.hdrMu.Lock()
	defer o.hdrMu.Unlock()
	return o.uuid
}

// SetUUID stores the merger session id (at most 36 characters in
// practice, 39 fit) and commits it.
func (o *Overlay) SetUUID(uuid string) error {
	if len(uuid) >= cowformat.UUIDField {
		return fmt.Errorf("cowstore: upload uuid %q is longer than %d characters", uuid, cowformat.UUIDField-1)
	}
	o.hdrMu.Lock()
	o.uuid = uuid
	o.hdrMu.Unlock()
	o.markHeader()
	return o.Commit()
}

// startBackground commits dirty metadata every CommitInterval.
func (o *Overlay) startBackground() {
	ctx, cancel := context.WithCancel(context.Background())
	o.stop = cancel
	o.bgDone = make(chan struct{})
	iv := o.opts.CommitInterval
	if iv == 0 {
		iv = time.Second
	}
	go func() {
		defer close(o.bgDone)
		if iv < 0 {
			return
		}
		t := time.NewTicker(iv)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if o.hasDirty() && o.Failed() == nil {
					if err := o.Commit(); err != nil {
						o.log.Error("background commit of the COW metadata failed", "dir", o.dir, "err", err)
					}
				}
			}
		}
	}()
}

func (o *Overlay) hasDirty() bool {
	o.dirtyMu.Lock()
	defer o.dirtyMu.Unlock()
	return o.headDirty || o.l1Dirty || len(o.dirty) > 0 || len(o.newTables) > 0
}

// Close commits everything and closes the session files.
func (o *Overlay) Close() error {
	if o.closed.Swap(true) {
		return nil
	}
	if o.stop != nil {
		o.stop()
		<-o.bgDone
	}
	err := o.commit()
	if cerr := o.data.Close(); err == nil {
		err = cerr
	}
	if cerr := o.meta.Close(); err == nil {
		err = cerr
	}
	o.lock.Close() // releases the lock
	return err
}

var _ io.ReaderAt = (*Overlay)(nil)
