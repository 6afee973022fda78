package cowstore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/fsutil"
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
		remote:    newReadAhead(opts.Remote),
		dirty:     map[int]struct{}{},
		newTables: map[int]struct{}{},
	}
}

// Create starts a new session in dir, an existing directory that holds no
// session yet (like the reference's -c). The image size and the valid
// remote size start as the remote image's size. The session directory is
// locked until Close: a second Create or Load of it, in this process or
// another, fails.
func Create(dir string, opts Options) (*Overlay, error) {
	if opts.Remote == nil {
		return nil, errors.New("cowstore: no remote image")
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("session directory: %w (create it first)", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("cowstore: session directory %s is not a directory", dir)
	}
	lock, err := lockSession(dir)
	if err != nil {
		return nil, err
	}
	o, err := create(dir, opts)
	if err != nil {
		lock.Close()
		return nil, err
	}
	o.lock = lock
	o.startBackground()
	o.log.Info("created COW session", "dir", dir, "image", o.fullName, "rid", opts.RID, "size", o.Size())
	return o, nil
}

func create(dir string, opts Options) (*Overlay, error) {
	for _, name := range []string{"meta", "data"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil && st.Size() > 0 {
			return nil, fmt.Errorf("cowstore: %s already holds a session (%s exists and is not empty): load it with -L, or use an empty directory", dir, name)
		}
	}
	size := opts.Remote.Size()
	if size < 0 || size > cowformat.MaxImageSize {
		return nil, fmt.Errorf("cowstore: image size %d is outside 0..%d", size, int64(cowformat.MaxImageSize))
	}
	o := newOverlay(dir, opts)
	o.imageSize.Store(size)
	o.validSize.Store(size)
	o.nextSlot = cowformat.FirstSlot
	o.imageName, o.fullName = truncateName(opts.ImageName), opts.ImageName
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
	fail := func(err error) (*Overlay, error) {
		meta.Close()
		data.Close()
		return nil, fmt.Errorf("create session in %s: %w", dir, err)
	}
	if err := meta.Truncate(cowformat.MetaSize); err != nil {
		return fail(err)
	}
	o.meta, o.data = opts.wrap("meta", meta), opts.wrap("data", data)
	var magic [8]byte
	le.PutUint64(magic[:], cowformat.DataMagic)
	if _, err := o.data.WriteAt(magic[:], 0); err != nil {
		return fail(err)
	}
	if err := writeRevision(dir, opts.RID); err != nil {
		return fail(err)
	}
	if err := writeName(dir, opts.ImageName); err != nil {
		return fail(err)
	}
	o.headDirty, o.l1Dirty = true, true
	if err := o.commit(); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fail(err)
	}
	return o, nil
}

func truncateName(s string) string {
	if len(s) > cowformat.NameField-1 {
		return s[:cowformat.NameField-1]
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
	if _, err := os.Stat(filepath.Join(dir, "meta")); err != nil {
		return nil, fmt.Errorf("load session: %w", err)
	}
	lock, err := lockSession(dir)
	if err != nil {
		return nil, err
	}
	o, err := open(dir, opts)
	if err != nil {
		lock.Close()
		return nil, err
	}
	o.lock = lock
	o.startBackground()
	dirty, clean := o.Counts()
	o.log.Info("loaded COW session", "dir", dir, "image", o.fullName, "rid", o.opts.RID, "size", o.Size(),
		"validRemoteSize", o.ValidRemoteSize(), "clusters", dirty+clean, "dirty", dirty, "uuid", o.uuid)
	return o, nil
}

// open opens and loads the session files (the directory is locked).
func open(dir string, opts Options) (*Overlay, error) {
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
	if err == nil && (o.ignoredTables > 0 || o.ignoredEntries > 0) {
		// Make the repair durable before anything reuses those tables and
		// slots.
		o.log.Warn("the COW session was interrupted during a metadata commit: ignoring the tables and slots that commit handed out (nothing acknowledged is lost)",
			"dir", dir, "tables", o.ignoredTables, "clusters", o.ignoredEntries)
		if err = o.commit(); err != nil {
			err = fmt.Errorf("repair: %w", err)
		}
	}
	if err != nil {
		meta.Close()
		data.Close()
		return nil, fmt.Errorf("load session %s: %w", dir, err)
	}
	return o, nil
}

// load checks a session's files and builds its Overlay: the header, the
// data file, the session's identity (image name and revision), then the
// L2 tables.
func load(dir string, opts Options, metaFile, dataFile *os.File) (*Overlay, error) {
	meta, data := opts.wrap("meta", metaFile), opts.wrap("data", dataFile)
	h, buf, err := readHeader(meta, metaFile)
	if err != nil {
		return nil, err
	}
	if err := checkDataFile(data, dataFile, h); err != nil {
		return nil, err
	}
	id, err := readIdentity(dir, h, opts)
	if err != nil {
		return nil, err
	}
	opts.RID = id.rid
	if err := checkRemoteSize(h, opts.Remote.Size()); err != nil {
		return nil, err
	}
	o := newOverlay(dir, opts)
	o.meta, o.data = meta, data
	o.imageSize.Store(int64(h.imageSize))
	o.validSize.Store(int64(h.validRemoteSize))
	o.nextL2 = h.nextL2
	o.nextSlot = h.nextClusterOffset
	o.uuid, o.imageName, o.created = h.uuid, h.imageName, h.creationTime
	o.fullName = id.fullName
	o.savedHeader = bytes.Clone(buf[:cowformat.HeaderSize])
	if err := o.loadTables(buf, h); err != nil {
		return nil, err
	}
	if err := id.record(dir); err != nil {
		return nil, err
	}
	return o, nil
}

// readHeader reads the header and L1 table (returned in buf) and checks
// the layout they describe.
func readHeader(meta io.ReaderAt, metaFile *os.File) (header, []byte, error) {
	mst, err := metaFile.Stat()
	if err != nil {
		return header{}, nil, err
	}
	buf := make([]byte, cowformat.StartL1+cowformat.L1Entries*4)
	if _, err := io.ReadFull(io.NewSectionReader(meta, 0, int64(len(buf))), buf); err != nil {
		return header{}, nil, fmt.Errorf("read header: %w", err)
	}
	h, err := parseHeader(buf)
	if err != nil {
		return header{}, nil, err
	}
	switch {
	case h.bitfieldSize != cowformat.BitfieldSize:
		return h, nil, fmt.Errorf("cowstore: bitfield size %d, want %d", h.bitfieldSize, cowformat.BitfieldSize)
	case h.version != cowformat.Version:
		return h, nil, fmt.Errorf("cowstore: session format version %d, this program reads version %d", h.version, cowformat.Version)
	case h.startL1 != cowformat.StartL1 || h.startL2 != cowformat.StartL2 || h.metaSize != cowformat.MetaSize:
		return h, nil, fmt.Errorf("cowstore: unexpected layout (startL1 %d, startL2 %d, metaSize %d)", h.startL1, h.startL2, h.metaSize)
	case h.nextL2 < 0 || h.nextL2 > cowformat.L1Entries:
		return h, nil, fmt.Errorf("cowstore: nextL2 %d outside 0..%d", h.nextL2, cowformat.L1Entries)
	case h.imageSize > cowformat.MaxImageSize:
		return h, nil, fmt.Errorf("cowstore: image size %d exceeds %d", h.imageSize, int64(cowformat.MaxImageSize))
	case h.nextClusterOffset < cowformat.FirstSlot || h.nextClusterOffset%cowformat.ClusterSize != 0:
		return h, nil, fmt.Errorf("cowstore: nextClusterOffset %d is not a slot boundary", h.nextClusterOffset)
	case mst.Size() < cowformat.MetaSize:
		return h, nil, fmt.Errorf("cowstore: meta file is %d bytes, want %d", mst.Size(), int64(cowformat.MetaSize))
	}
	return h, buf, nil
}

// checkDataFile checks the data file's magic and that the slots the
// header hands out lie within it.
func checkDataFile(data io.ReaderAt, dataFile *os.File, h header) error {
	dst, err := dataFile.Stat()
	if err != nil {
		return err
	}
	var dmagic [8]byte
	if _, err := data.ReadAt(dmagic[:], 0); err != nil {
		return fmt.Errorf("read data magic: %w", err)
	}
	switch le.Uint64(dmagic[:]) {
	case cowformat.DataMagic:
	case bits.ReverseBytes64(cowformat.DataMagic):
		return errors.New("cowstore: data file has the wrong byte order")
	default:
		return errors.New("cowstore: data file: bad magic")
	}
	if h.nextClusterOffset > dst.Size()+cowformat.ClusterSize {
		return fmt.Errorf("cowstore: nextClusterOffset %d lies beyond the data file (%d bytes): data file truncated?", h.nextClusterOffset, dst.Size())
	}
	return nil
}

// identity is what a session records beside the reference's files: the
// image's full name and the revision it was created from.
type identity struct {
	fullName   string
	rid        uint16
	recordName bool // the name file is missing: write it
	recordRID  bool // the revision file is missing: write it
}

// readIdentity reads the session's name and revision records and checks
// them against the caller's options (what the reference does not check).
func readIdentity(dir string, h header, opts Options) (identity, error) {
	var id identity
	var err error
	id.fullName, id.recordName, err = sessionName(dir, h.imageName, opts.ImageName)
	if err != nil {
		return id, err
	}
	rid, err := readRevision(dir)
	switch {
	case err == nil && opts.RID != 0 && rid != opts.RID:
		return id, fmt.Errorf("cowstore: the session belongs to revision %d of %s, not revision %d", rid, id.fullName, opts.RID)
	case err == nil:
		id.rid = rid
	case errors.Is(err, os.ErrNotExist) && opts.RID == 0:
		return id, fmt.Errorf("cowstore: the session has no revision record (made by the reference client?): give the revision it was created from with -r")
	case errors.Is(err, os.ErrNotExist):
		id.rid, id.recordRID = opts.RID, true
	default:
		return id, err
	}
	return id, nil
}

// record writes the records that were missing.
func (id identity) record(dir string) error {
	if id.recordRID {
		if err := writeRevision(dir, id.rid); err != nil {
			return err
		}
	}
	if id.recordName {
		return writeName(dir, id.fullName)
	}
	return nil
}

// checkRemoteSize checks the header's sizes against the remote image.
func checkRemoteSize(h header, remote int64) error {
	if int64(h.validRemoteSize) > remote {
		return fmt.Errorf("cowstore: the session expects %d valid bytes of the remote image, but it has only %d: wrong image or revision?", h.validRemoteSize, remote)
	}
	if h.validRemoteSize > h.imageSize {
		return fmt.Errorf("cowstore: validRemoteSize %d exceeds the image size %d", h.validRemoteSize, h.imageSize)
	}
	return nil
}

// loadTables reads the L2 tables the L1 table in buf points to. Tables
// and slots beyond the header's nextL2 and nextClusterOffset were handed
// out by a commit that never wrote its header: they count as never
// written (doc.go, "Durability").
func (o *Overlay) loadTables(buf []byte, h header) error {
	seen := map[int32]bool{}
	slots := map[int64]bool{}
	tbuf := make([]byte, cowformat.L2TableSize)
	for l1 := range cowformat.L1Entries {
		k := int32(le.Uint32(buf[cowformat.StartL1+4*l1:]))
		switch {
		case k == -1:
			continue
		case k >= h.nextL2 && k < cowformat.L1Entries:
			o.ignoredTables++
			o.l1Dirty = true
			continue
		case k < 0 || k >= cowformat.L1Entries:
			return fmt.Errorf("cowstore: L1[%d] = %d, not a table index below %d", l1, k, cowformat.L1Entries)
		case seen[k]:
			return fmt.Errorf("cowstore: L2 table %d is referenced twice", k)
		}
		seen[k] = true
		if _, err := o.meta.ReadAt(tbuf, metaOffset(k, 0)); err != nil {
			return fmt.Errorf("read L2 table %d: %w", k, err)
		}
		t, err := o.parseTable(l1, k, tbuf, h.nextClusterOffset, slots)
		if err != nil {
			return err
		}
		o.tables[l1].Store(t)
		o.tableSaved[l1] = true
	}
	return nil
}

// parseTable parses L2 table k (for L1 entry l1) from tbuf, checking each
// slot offset against nextSlot and the slots already in use.
func (o *Overlay) parseTable(l1 int, k int32, tbuf []byte, nextSlot int64, slots map[int64]bool) (*table, error) {
	t := &table{index: k}
	for i := range t.entries {
		c := l1*cowformat.L2Entries + i
		e := parseEntry(tbuf[i*cowformat.L2EntrySize:])
		switch {
		case e.offset == -1:
			if e.popcount() > 0 {
				return nil, fmt.Errorf("cowstore: cluster %d has blocks but no slot", c)
			}
		case e.offset < cowformat.FirstSlot || e.offset%cowformat.ClusterSize != 0:
			return nil, fmt.Errorf("cowstore: cluster %d: slot offset %d is not a slot boundary", c, e.offset)
		case e.offset >= nextSlot:
			// a slot handed out by a commit that never wrote its header:
			// the cluster was never written
			e = entry{offset: -1}
			o.ignoredEntries++
			o.dirty[c] = struct{}{}
		case slots[e.offset]:
			return nil, fmt.Errorf("cowstore: cluster %d: slot %d is used twice", c, e.offset)
		default:
			slots[e.offset] = true
		}
		t.entries[i] = e
	}
	return t, nil
}
