package cowstore

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"golang.org/x/sys/unix"
)

func (o *Options) logger() *slog.Logger {
	if o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

func newOverlay(dir string, opts Options) *Overlay {
	return &Overlay{
		dir:       dir,
		opts:      opts,
		log:       opts.logger(),
		remote:    opts.Remote,
		dirty:     map[int]struct{}{},
		newTables: map[int]struct{}{},
	}
}

// Create starts a new session in dir, an existing directory that holds no
// session yet (like the reference's -c). The image size and the valid
// remote size start as the remote image's size.
func Create(dir string, opts Options) (*Overlay, error) {
	if opts.Remote == nil {
		return nil, errors.New("cowstore: no remote image")
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("session directory: %w (create it first)", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("session directory %s is not a directory", dir)
	}
	for _, name := range []string{"meta", "data"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil && st.Size() > 0 {
			return nil, fmt.Errorf("%s already holds a session (%s exists and is not empty): load it with -L, or use an empty directory", dir, name)
		}
	}
	size := opts.Remote.Size()
	if size < 0 || size > MaxImageSize {
		return nil, fmt.Errorf("image size %d is outside 0..%d", size, int64(MaxImageSize))
	}
	o := newOverlay(dir, opts)
	o.imageSize.Store(size)
	o.validSize.Store(size)
	o.nextSlot = FirstSlot
	o.imageName = truncateName(opts.ImageName)
	o.created = uint64(o.now().Unix())
	meta, err := os.OpenFile(filepath.Join(dir, "meta"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	data, err := os.OpenFile(filepath.Join(dir, "data"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		meta.Close()
		return nil, err
	}
	o.meta, o.data = meta, data
	fail := func(err error) (*Overlay, error) {
		meta.Close()
		data.Close()
		return nil, fmt.Errorf("create session in %s: %w", dir, err)
	}
	if err := meta.Truncate(MetaSize); err != nil {
		return fail(err)
	}
	var magic [8]byte
	le.PutUint64(magic[:], DataMagic)
	if _, err := data.WriteAt(magic[:], 0); err != nil {
		return fail(err)
	}
	if err := writeRevision(dir, opts.RID); err != nil {
		return fail(err)
	}
	o.headDirty = true
	if err := o.commit(); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fail(err)
	}
	o.startBackground()
	o.log.Info("created COW session", "dir", dir, "image", o.imageName, "rid", opts.RID, "size", size)
	return o, nil
}

func truncateName(s string) string {
	if len(s) > nameField-1 {
		return s[:nameField-1]
	}
	return s
}

// Load reopens a session (the reference's -L). Besides the reference's
// checks it verifies what the reference skips: that the session belongs to
// opts.ImageName and opts.RID, that every L1 value is below nextL2, that
// every slot lies below nextClusterOffset and inside the data file, and
// that validRemoteSize does not exceed the remote image. If the session
// has no revision record (one made by the reference client), opts.RID must
// be set and is recorded.
func Load(dir string, opts Options) (*Overlay, error) {
	if opts.Remote == nil {
		return nil, errors.New("cowstore: no remote image")
	}
	meta, err := os.OpenFile(filepath.Join(dir, "meta"), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("load session: %w", err)
	}
	data, err := os.OpenFile(filepath.Join(dir, "data"), os.O_RDWR, 0)
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("load session: %w", err)
	}
	o, err := load(dir, opts, meta, data)
	if err != nil {
		meta.Close()
		data.Close()
		return nil, fmt.Errorf("load session %s: %w", dir, err)
	}
	o.startBackground()
	dirty, clean := o.Counts()
	o.log.Info("loaded COW session", "dir", dir, "image", o.imageName, "rid", o.opts.RID, "size", o.Size(),
		"validRemoteSize", o.ValidRemoteSize(), "clusters", dirty+clean, "dirty", dirty, "uuid", o.uuid)
	return o, nil
}

func load(dir string, opts Options, meta, data *os.File) (*Overlay, error) {
	buf := make([]byte, StartL1+L1Entries*4)
	if _, err := io.ReadFull(io.NewSectionReader(meta, 0, int64(len(buf))), buf); err != nil {
		return nil, fmt.Errorf("read header: %w", err)
	}
	h, err := parseHeader(buf)
	if err != nil {
		return nil, err
	}
	switch {
	case h.bitfieldSize != BitfieldSize:
		return nil, fmt.Errorf("bitfield size %d, want %d", h.bitfieldSize, BitfieldSize)
	case h.version != Version:
		return nil, fmt.Errorf("session format version %d, this program reads version %d", h.version, Version)
	case h.startL1 != StartL1 || h.startL2 != StartL2 || h.metaSize != MetaSize:
		return nil, fmt.Errorf("unexpected layout (startL1 %d, startL2 %d, metaSize %d)", h.startL1, h.startL2, h.metaSize)
	case h.nextL2 < 0 || h.nextL2 > L1Entries:
		return nil, fmt.Errorf("nextL2 %d outside 0..%d", h.nextL2, L1Entries)
	case h.imageSize > MaxImageSize:
		return nil, fmt.Errorf("image size %d exceeds %d", h.imageSize, int64(MaxImageSize))
	case h.nextClusterOffset < FirstSlot || h.nextClusterOffset%ClusterSize != 0:
		return nil, fmt.Errorf("nextClusterOffset %d is not a slot boundary", h.nextClusterOffset)
	}
	mst, err := meta.Stat()
	if err != nil {
		return nil, err
	}
	if mst.Size() < MetaSize {
		return nil, fmt.Errorf("meta file is %d bytes, want %d", mst.Size(), int64(MetaSize))
	}
	var dmagic [8]byte
	if _, err := data.ReadAt(dmagic[:], 0); err != nil {
		return nil, fmt.Errorf("read data magic: %w", err)
	}
	switch le.Uint64(dmagic[:]) {
	case DataMagic:
	case bits.ReverseBytes64(DataMagic):
		return nil, errors.New("data file has the wrong byte order")
	default:
		return nil, errors.New("data file: bad magic")
	}
	dst, err := data.Stat()
	if err != nil {
		return nil, err
	}
	if h.nextClusterOffset > dst.Size()+ClusterSize {
		return nil, fmt.Errorf("nextClusterOffset %d lies beyond the data file (%d bytes): data file truncated?", h.nextClusterOffset, dst.Size())
	}
	// What the reference does not check.
	if opts.ImageName != "" && h.imageName != truncateName(opts.ImageName) {
		return nil, fmt.Errorf("the session belongs to image %q, not %q", h.imageName, opts.ImageName)
	}
	rid, err := readRevision(dir)
	switch {
	case err == nil && opts.RID != 0 && rid != opts.RID:
		return nil, fmt.Errorf("the session belongs to revision %d of %s, not revision %d", rid, h.imageName, opts.RID)
	case err == nil:
		opts.RID = rid
	case errors.Is(err, os.ErrNotExist) && opts.RID == 0:
		return nil, fmt.Errorf("the session has no revision record (made by the reference client?): give the revision it was created from with -r")
	case errors.Is(err, os.ErrNotExist):
		if err := writeRevision(dir, opts.RID); err != nil {
			return nil, err
		}
	default:
		return nil, err
	}
	if remote := opts.Remote.Size(); int64(h.validRemoteSize) > remote {
		return nil, fmt.Errorf("the session expects %d valid bytes of the remote image, but it has only %d: wrong image or revision?", h.validRemoteSize, remote)
	}
	if h.validRemoteSize > h.imageSize {
		return nil, fmt.Errorf("validRemoteSize %d exceeds the image size %d", h.validRemoteSize, h.imageSize)
	}

	o := newOverlay(dir, opts)
	o.meta, o.data = meta, data
	o.imageSize.Store(int64(h.imageSize))
	o.validSize.Store(int64(h.validRemoteSize))
	o.nextL2 = h.nextL2
	o.nextSlot = h.nextClusterOffset
	o.uuid, o.imageName, o.created = h.uuid, h.imageName, h.creationTime
	seen := map[int32]bool{}
	slots := map[int64]bool{}
	tbuf := make([]byte, L2TableSize)
	for l1 := range L1Entries {
		k := int32(le.Uint32(buf[StartL1+4*l1:]))
		if k == -1 {
			continue
		}
		if k < 0 || k >= h.nextL2 {
			return nil, fmt.Errorf("L1[%d] = %d, not below nextL2 %d", l1, k, h.nextL2)
		}
		if seen[k] {
			return nil, fmt.Errorf("L2 table %d is referenced twice", k)
		}
		seen[k] = true
		if _, err := meta.ReadAt(tbuf, metaOffset(k, 0)); err != nil {
			return nil, fmt.Errorf("read L2 table %d: %w", k, err)
		}
		t := &table{index: k}
		for i := range t.entries {
			e := parseEntry(tbuf[i*L2EntrySize:])
			if e.offset != -1 {
				if e.offset < FirstSlot || e.offset%ClusterSize != 0 || e.offset >= h.nextClusterOffset {
					return nil, fmt.Errorf("cluster %d: slot offset %d is not a slot below nextClusterOffset %d", l1*L2Entries+i, e.offset, h.nextClusterOffset)
				}
				if slots[e.offset] {
					return nil, fmt.Errorf("cluster %d: slot %d is used twice", l1*L2Entries+i, e.offset)
				}
				slots[e.offset] = true
			} else if e.popcount() > 0 {
				return nil, fmt.Errorf("cluster %d has blocks but no slot", l1*L2Entries+i)
			}
			t.entries[i] = e
		}
		o.tables[l1].Store(t)
		o.tableSaved[l1] = true
	}
	return o, nil
}

// writeRevision records rid in the session's revision file, durably.
func writeRevision(dir string, rid uint16) error {
	return fsutil.WriteFileAtomic(revisionFile(dir), []byte(strconv.Itoa(int(rid))+"\n"), 0o600)
}

func readRevision(dir string) (uint16, error) {
	b, err := os.ReadFile(revisionFile(dir))
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%s: not a revision number: %q", revisionFile(dir), b)
	}
	return uint16(n), nil
}

// fdatasync flushes a file's data (and the metadata needed to read it).
func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

// ErrNoRevision means a session has no revision record.
var ErrNoRevision = errors.New("the session has no revision record")

// SessionRevision returns the revision recorded in a session directory.
func SessionRevision(dir string) (uint16, error) {
	rid, err := readRevision(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, ErrNoRevision
	}
	return rid, err
}
