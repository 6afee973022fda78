package server

// The iSCSI target's view of the server: target names resolve to images
// the way SELECT_IMAGE does (on a proxy, unknown images are cloned from
// the uplinks), and reads take the DNBD3 clients' path: sendfile from the
// image file where the data is local, the uplink for blocks an
// incomplete copy lacks, MEDIUM ERROR where a DNBD3 client would get
// CMD_ERROR.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
	"github.com/dnbd3go/dnbd3go/server/iscsi"
)

// newISCSITarget returns the server's iSCSI target.
func (s *Server) newISCSITarget() *iscsi.Target {
	return iscsi.New(iscsi.Config{
		Backend: iscsiBackend{s},
		Logger:  s.log,
		Timeout: func() time.Duration { return s.config().ClientTimeout },
		Sent:    func(n int64) { s.bytesSent.Add(uint64(n)) },
	})
}

// iscsiBackend resolves target names to images.
type iscsiBackend struct{ s *Server }

// Open returns the image a target name selects: the readings of
// iscsi.ParseTargetName in order, then the same names ignoring letter
// case (initiators that lower-case target names, as iSCSI names are
// case-insensitive).
func (b iscsiBackend) Open(ctx context.Context, target string) (iscsi.Disk, error) {
	refs := iscsi.ParseTargetName(target)
	var firstErr error
	for _, ref := range refs {
		img, err := b.image(ref)
		if err == nil {
			return b.disk(img), nil
		}
		if errors.Is(err, errTooManyImages) {
			return nil, err
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	for _, ref := range refs {
		if ref.ByWWN {
			continue
		}
		if img := b.foldedImage(ref); img != nil {
			return b.disk(img), nil
		}
	}
	if firstErr == nil {
		firstErr = errors.New("server: no image name in it")
	}
	return nil, fmt.Errorf("%w: %s: %w", iscsi.ErrTargetNotFound, target, firstErr)
}

// disk wraps an image with a client reference as a Disk; on a proxy the
// uplink of an incomplete image starts now.
func (b iscsiBackend) disk(img *image) *iscsiDisk {
	if b.s.config().IsProxy && img.incomplete() {
		b.s.proxy.ensureUplink(img) // errors show at the first read
	}
	return &iscsiDisk{s: b.s, img: img}
}

// image resolves one reading of a target name, with a client reference.
func (b iscsiBackend) image(ref iscsi.ImageRef) (*image, error) {
	if !ref.ByWWN {
		return b.s.selectImage(protocol.SelectImage{Name: ref.Name, RID: ref.RID})
	}
	var best *image
	for _, img := range b.s.store.list() {
		if img.WWN == ref.WWN && (img.RID == ref.RID || ref.RID == 0 && (best == nil || img.RID > best.RID)) {
			best = img
		}
	}
	if best == nil {
		return nil, fmt.Errorf("%w: no loaded image has WWN %#016x", errImageNotFound, ref.WWN)
	}
	return b.s.getImage(best.Name, best.RID)
}

// foldedImage finds a loaded image whose name equals ref's ignoring
// letter case, if exactly one name does.
func (b iscsiBackend) foldedImage(ref iscsi.ImageRef) *image {
	var name string
	for _, img := range b.s.store.list() {
		if strings.EqualFold(img.Name, ref.Name) && (ref.RID == 0 || img.RID == ref.RID) {
			if name != "" && name != img.Name {
				return nil // ambiguous
			}
			name = img.Name
		}
	}
	if name == "" {
		return nil
	}
	img, err := b.s.getImage(name, ref.RID)
	if err != nil {
		return nil
	}
	return img
}

// Targets lists the loaded images for SendTargets=All.
func (b iscsiBackend) Targets() []string {
	imgs := b.s.store.list()
	out := make([]string, len(imgs))
	for i, img := range imgs {
		out[i] = iscsi.DiscoveryName(img.Name, img.RID, img.WWN)
	}
	return out
}

// iscsiDisk is an image as an iSCSI logical unit. It holds a client
// reference until Close.
type iscsiDisk struct {
	s    *Server
	img  *image
	once sync.Once
}

func (d *iscsiDisk) Size() int64  { return d.img.VirtualSize }
func (d *iscsiDisk) Name() string { return d.img.Name }
func (d *iscsiDisk) RID() uint16  { return d.img.RID }
func (d *iscsiDisk) WWN() uint64  { return d.img.WWN }
func (d *iscsiDisk) Close()       { d.once.Do(func() { d.s.store.Release(d.img) }) }

// Read makes [off, off+n) readable as a DNBD3 GET_BLOCK would: from the
// file if present, refused if it touches a hash block that failed its
// check, else (proxy) fetched from the uplink.
func (d *iscsiDisk) Read(ctx context.Context, off, n int64) (iscsi.Data, error) {
	img := d.img
	if off < 0 || n <= 0 || off+n > img.VirtualSize {
		return nil, fmt.Errorf("%w: %d bytes at %d outside the image", iscsi.ErrMedium, n, off)
	}
	img.touch()
	if img.cache.Load() == nil && !img.hasBad.Load() {
		return fileData{img, off, &d.s.pipes}, nil
	}
	switch img.locate(off, off+n) {
	case inBad:
		return nil, fmt.Errorf("%w: a hash block of the range failed its check", iscsi.ErrMedium)
	case inFile:
		return fileData{img, off, &d.s.pipes}, nil
	}
	return d.s.awaitRange(ctx, img, off, n)
}

// Ready reports whether the range is in the file (or refused at once).
func (d *iscsiDisk) Ready(off, n int64) bool {
	return d.img.locate(off, off+n) != notInFile
}

// awaitRange fetches the absent blocks of [off, off+n) from the uplink,
// in pieces of at most maxPayload, with a prefetch after the range like a
// DNBD3 client's relayed request. The data then comes from the file, or
// from memory when the copy cannot be written.
func (s *Server) awaitRange(ctx context.Context, img *image, off, n int64) (iscsi.Data, error) {
	cfg := s.config()
	if !cfg.IsProxy {
		return nil, fmt.Errorf("%w: the image is incomplete and this server is no proxy", iscsi.ErrMedium)
	}
	up, err := s.proxy.ensureUplink(img)
	if err != nil {
		return nil, fmt.Errorf("%w: no uplink: %w", iscsi.ErrMedium, err)
	}
	const hops = 1 // a client's request, relayed once
	chunk := max(cfg.MaxPayload&^(protocol.BlockSize-1), protocol.BlockSize)
	start := off &^ (protocol.BlockSize - 1)
	end := protocol.VirtualSize(off + n)
	var mem []byte // set once a piece is only in memory
	for pos, pend := start, start; pos < end; pos = pend {
		pend = min(pos+chunk, end)
		buf, err := awaitRelay(ctx, up, img, pos, fetchEnd(cfg, img.VirtualSize, pos, pend), hops)
		if err != nil {
			return nil, err
		}
		if buf != nil && mem == nil {
			mem = make([]byte, end-start)
			if err := readImage(img, mem[:pos-start], start); err != nil {
				return nil, fmt.Errorf("%w: %w", iscsi.ErrMedium, err)
			}
		}
		switch {
		case mem == nil:
		case buf != nil:
			copy(mem[pos-start:pend-start], buf)
		default:
			if err := readImage(img, mem[pos-start:pend-start], pos); err != nil {
				return nil, fmt.Errorf("%w: %w", iscsi.ErrMedium, err)
			}
		}
	}
	if end-start <= cfg.MaxPrefetch {
		up.prefetchAfter(cfg, end, end-start, hops)
	}
	if mem != nil {
		return memData(mem[off-start : off-start+n]), nil
	}
	return fileData{img, off, &s.pipes}, nil
}

// awaitRelay waits until the uplink brought [start, end) (4 KiB aligned).
// It returns the data if it only exists in a fetch's buffer (the local
// copy could not be written), nil if it is in the file.
func awaitRelay(ctx context.Context, up *uplink, img *image, start, end int64, hops uint8) ([]byte, error) {
	r := &relay{off: start, size: uint32(end - start), done: make(chan struct{}), img: img}
	ready, err := up.request(r, start, end, hops)
	if err != nil {
		return nil, fmt.Errorf("%w: uplink: %w", iscsi.ErrMedium, err)
	}
	if !ready {
		select {
		case <-r.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if r.failed.Load() {
		return nil, fmt.Errorf("%w: the uplink could not deliver %d bytes at %d", iscsi.ErrMedium, end-start, start)
	}
	if cm := img.cache.Load(); cm == nil || cm.has(start, end) {
		return nil, nil
	}
	if r.data != nil {
		return r.data, nil
	}
	return nil, fmt.Errorf("%w: relayed data not in the local copy", iscsi.ErrMedium)
}

// readImage reads image bytes at off into p, zeros past the file's end
// (the 4 KiB padding).
func readImage(img *image, p []byte, off int64) error {
	n := 0
	if off < img.RealSize {
		var err error
		n, err = img.file.ReadAt(p[:min(int64(len(p)), img.RealSize-off)], off)
		if err != nil {
			return err
		}
	}
	clear(p[n:])
	return nil
}

// fileData is image data in the file: sent without a copy, as DNBD3
// replies are (sock.sendFile: splice through a pooled pipe, or sendfile).
type fileData struct {
	img   *image
	base  int64     // image offset of the range's start
	pipes *pipePool // the server's pipes for large replies
}

func (f fileData) SendTo(c net.Conn, hdr []byte, off, n int64) error {
	sk := connSock(c, f.pipes)
	return sk.sendFile(hdr, f.img.file, f.img.fd, f.img.RealSize, f.base+off, n)
}

// sockConn is a connection handed to the iSCSI target together with the
// sock the server reads it through, so that Data-In from the file
// (fileData.SendTo, called under the session's write lock) sends through
// it instead of setting up a sock per PDU.
type sockConn struct {
	net.Conn
	sk *sock
}

// connSock returns c's sock if c is a sockConn, else a new one.
func connSock(c net.Conn, pipes *pipePool) *sock {
	if sc, ok := c.(*sockConn); ok {
		return sc.sk
	}
	return newSock(c, pipes)
}

func (f fileData) ReadAt(p []byte, off int64) (int, error) {
	if err := readImage(f.img, p, f.base+off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// memData is image data in memory.
type memData []byte

func (m memData) SendTo(c net.Conn, hdr []byte, off, n int64) error {
	bufs := net.Buffers{hdr, m[off : off+n]}
	_, err := bufs.WriteTo(c)
	return err
}

func (m memData) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }

// iscsiClients returns the RPC client list entries of the iSCSI sessions
// of images: the DNBD3 clients' fields plus the initiator's name.
func (s *Server) iscsiClients() [][]byte {
	var items [][]byte
	for _, si := range s.iscsi.Sessions() {
		d, ok := si.Disk.(*iscsiDisk)
		if !ok {
			continue // discovery session
		}
		c := newJSONObject()
		c.str("address", si.Remote.String())
		c.int("imageId", int64(d.img.ID))
		c.int("isServer", 0)
		c.uint("bytesSent", si.BytesSent)
		c.str("protocol", "iscsi")
		c.str("initiator", si.Initiator)
		items = append(items, c.bytes())
	}
	return items
}
