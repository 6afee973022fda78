package server

// Reuse of the previous revision: a new revision of an image differs
// from the one before in a few 16 MiB hash blocks. When a proxy
// replicates name.r(N+1) and has an earlier revision of name (the
// highest one below N+1, complete or partly cached with its `.map`) and
// both have CRC lists, every hash block whose CRC is the same in both
// lists, covers the same range and is fully present in the old revision
// is copied locally (fsutil.CopyRange: a reflink where the file system
// allows, else copy_file_range) instead of being fetched over the
// uplink. The copy is checked against the NEW list before its blocks are
// marked present; a block that fails (or whose source changed) is fetched
// from the uplink like any other. Nothing of the wire protocol changes:
// the lists are the `.crc` files, fetched with GET_CRC32 when the copy
// was created.
//
// The copying runs when the image's uplink connects (after the clone, or
// when an incomplete copy is used again after a restart), one hash block
// at a time. Each block is claimed as a fetch of kind fetchReuse in the
// uplink's queue while it is copied: client reads of it wait for the copy
// like for any fetch in flight, background replication and other fetches
// leave it alone, and a failed copy becomes an ordinary fetch of the
// block (up.run). Background replication skips the planned blocks until
// the walk ends; client reads of blocks not copied yet are relayed as
// usual.
//
// The old revision is pinned (Image.reusePins) while the new one is
// cloned and for as long as the new one's uplink runs, so the LRU
// deletion (lru.go) never removes it then.

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// reusePlan says which hash blocks of an image a reuse walk copies.
type reusePlan struct {
	blocks []bool // by hash block: to be copied from the previous revision
}

// reserved reports whether the byte at off lies in a planned hash block.
func (pl *reusePlan) reserved(off int64) bool {
	hb := off / protocol.HashBlockSize
	return hb < int64(len(pl.blocks)) && pl.blocks[hb]
}

// after returns the end of the hash block holding off.
func (pl *reusePlan) after(off int64) int64 {
	return (off/protocol.HashBlockSize + 1) * protocol.HashBlockSize
}

// reuseSource returns the revision of name that a copy of rid can reuse
// blocks of: the highest revision below rid held locally, if it has a
// CRC list. It is returned referenced and pinned against LRU deletion;
// releaseSource undoes both. nil if there is none.
func (p *proxy) reuseSource(name string, rid uint16) *image {
	old := p.s.store.latestRIDBelow(name, int(rid))
	if old == 0 {
		return nil
	}
	// store.Get, not getImage: making room could close the uplink that
	// is asking (its image has no client yet).
	img, err := p.s.store.get(name, old)
	if err != nil {
		return nil
	}
	defer p.s.store.Release(img) // a reference, not a user, keeps it
	if img.crcList() == nil || !img.ref() {
		return nil
	}
	p.pinMu.Lock()
	img.reusePins.Add(1)
	p.pinMu.Unlock()
	return img
}

// releaseSource drops what reuseSource took (nil: nothing).
func (p *proxy) releaseSource(img *image) {
	if img == nil {
		return
	}
	img.reusePins.Add(-1)
	img.unref()
}

// reusable returns the hash blocks of up's image that can be copied from
// src: the same CRC in both lists, the same range, fully present in src
// and not (fully) present here yet.
func (up *uplink) reusable(src *image) []int {
	img := up.img
	cm := img.cache.Load()
	list, old := img.crcList(), src.crcList()
	if cm == nil || list == nil || old == nil || img.syncFailed() != nil || img.problems.Load()&problemWrite != 0 {
		return nil
	}
	var out []int
	for hb := range min(len(list), len(old)) {
		start, end := hashBlockBounds(hb, img.VirtualSize)
		if list[hb] != old[hb] || end != min(start+protocol.HashBlockSize, src.VirtualSize) ||
			cm.hashBlockComplete(hb) || !src.holdsHashBlock(hb) {
			continue
		}
		out = append(out, hb)
	}
	return out
}

// hashBlockBounds returns the byte range of hash block hb of an image of
// virtualSize bytes.
func hashBlockBounds(hb int, virtualSize int64) (start, end int64) {
	start = int64(hb) * protocol.HashBlockSize
	return start, min(start+protocol.HashBlockSize, virtualSize)
}

// holdsHashBlock reports whether hash block hb of img is present locally
// and has not failed a check.
func (img *image) holdsHashBlock(hb int) bool {
	if cm := img.cache.Load(); cm != nil && !cm.hashBlockComplete(hb) {
		return false
	}
	start, end := hashBlockBounds(hb, img.VirtualSize)
	return !img.hasBad.Load() || !img.touchesBad(start, end)
}

// startReuse plans the reuse of the previous revision for up's image and
// starts the walk that copies it. Called when the uplink connected,
// before background replication starts.
func (up *uplink) startReuse() {
	img := up.img
	if img.cache.Load() == nil || img.crcList() == nil {
		return
	}
	src := up.p.reuseSource(img.Name, img.RID)
	if src == nil {
		return
	}
	blocks := up.reusable(src)
	if len(blocks) == 0 {
		up.log.Info("nothing to reuse from the previous revision (no hash block with the same CRC that is not here yet)", "previous", src.String())
		up.p.releaseSource(src)
		return
	}
	plan := &reusePlan{blocks: make([]bool, protocol.HashBlockCount(img.VirtualSize))}
	for _, hb := range blocks {
		plan.blocks[hb] = true
	}
	up.reuse.Store(plan)
	if !up.spawn(func() { up.reuseWalk(src, blocks) }) {
		up.reuse.Store(nil)
		up.p.releaseSource(src)
	}
}

// errReuseSource means the previous revision's hash block changed or
// vanished while it was copied.
var errReuseSource = errors.New("server: the previous revision no longer holds this hash block")

// reuseWalk copies the planned hash blocks from src, then keeps src
// pinned until the uplink closes (the replication of the new revision
// has ended or stopped).
func (up *uplink) reuseWalk(src *image, blocks []int) {
	defer up.p.releaseSource(src)
	started := time.Now()
	var reused int64
	var copied, failed int
	buf := make([]byte, 1<<20)
	// Blocks busy with other fetches (client reads) are tried again
	// once the rest is done.
	for pass := 0; pass < 2 && len(blocks) > 0 && up.ctx.Err() == nil; pass++ {
		var busy []int
		for _, hb := range blocks {
			if up.ctx.Err() != nil {
				break
			}
			start, end := hashBlockBounds(hb, up.img.VirtualSize)
			f, ok := up.claimReuse(start, end)
			if f == nil {
				if !ok {
					busy = append(busy, hb)
				}
				continue
			}
			n, err := up.reuseBlock(f, src, hb, buf)
			if err != nil {
				failed++
				up.log.Warn("hash block copied from the previous revision failed its check; fetching it from the uplink",
					"block", hb, "previous", src.String(), "err", err)
				up.wg.Add(1) // the walk's own count keeps the group open
				go up.run(f) // an ordinary fetch of the block, which finishes f
				continue
			}
			reused += n
			copied++
			up.finish(f)
		}
		blocks = busy
		if len(blocks) > 0 && pass == 0 {
			select {
			case <-up.ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
	up.reuse.Store(nil)
	select {
	case up.bgrWake <- struct{}{}:
	default:
	}
	up.log.Info(fmt.Sprintf("reused %d hash blocks (%d bytes) of %s", copied, reused, src.String()),
		"previous", src.String(), "bytesReused", reused, "failedChecks", failed, "leftToFetch", len(blocks),
		"took", time.Since(started).Round(time.Millisecond))
	<-up.ctx.Done()
}

// claimReuse puts a fetch of kind fetchReuse for [start, end) into the
// queue, so that nothing else fetches into the range while it is
// copied. It returns nil, true if there is nothing to do (closing,
// complete, present) and nil, false if other fetches overlap the range
// or the queue is full (try again later).
func (up *uplink) claimReuse(start, end int64) (*fetch, bool) {
	up.mu.Lock()
	defer up.mu.Unlock()
	cm := up.img.cache.Load()
	if up.closing || cm == nil || cm.has(start, end) {
		return nil, true
	}
	if len(up.fetches) >= uplinkQueueMax {
		return nil, false
	}
	for _, f := range up.fetches {
		if f.start < end && f.end > start {
			return nil, false
		}
	}
	f := &fetch{start: start, end: end, hops: bgrHops(up.p.cfg()), kind: fetchReuse}
	up.fetches = append(up.fetches, f)
	return f, true
}

// reuseBlock copies the absent blocks of hash block hb (claimed as f)
// from src, checks the hash block's CRC against the image's list and
// marks the copied blocks present. It returns the bytes copied. On error
// nothing is marked.
func (up *uplink) reuseBlock(f *fetch, src *image, hb int, buf []byte) (int64, error) {
	img := up.img
	cm := img.cache.Load()
	if cm == nil {
		return 0, nil
	}
	if !src.holdsHashBlock(hb) {
		return 0, errReuseSource
	}
	w, err := img.writer()
	if err != nil {
		return 0, err
	}
	runs := cm.missing(f.start, f.end)
	var n int64
	for _, r := range runs {
		if err := copyFromSource(w, src, r[0], r[1]); err != nil {
			return 0, err
		}
		n += r[1] - r[0]
	}
	if !src.holdsHashBlock(hb) {
		return 0, errReuseSource
	}
	got, err := protocol.BlockCRC(img.file, img.RealSize, hb, buf)
	if err != nil {
		return 0, err
	}
	if want := img.crcList()[hb]; got != want {
		return 0, fmt.Errorf("server: CRC %#08x after the copy, the new revision's list says %#08x", got, want)
	}
	for _, r := range runs {
		if completed, _ := cm.setRange(r[0], r[1]); completed {
			up.p.goTracked(func() { up.p.completed(img, cm) })
		}
	}
	img.bytesReused.Add(uint64(n))
	up.p.s.bytesReused.Add(uint64(n))
	return n, nil
}

// copyFromSource copies [start, end) of src's file to w at the same
// offset; what lies beyond src's file (its 4 KiB padding) is written as
// zeros.
func copyFromSource(w *os.File, src *image, start, end int64) error {
	if data := min(end, src.RealSize); data > start {
		if _, err := fsutil.CopyRange(w, src.file, start, data-start); err != nil {
			return fmt.Errorf("copy from %s: %w", src.String(), err)
		}
		start = data
	}
	if end > start {
		if _, err := w.WriteAt(make([]byte, end-start), start); err != nil {
			return err
		}
	}
	return nil
}

// putReused adds our RPC key bytesReused (bytes of replicated images
// copied from a previous revision instead of received) to o, for the
// server's stats or one image. Absent while nothing was reused, so that
// a proxy that never reuses answers with the reference's keys only.
func putReused(o *jsonObject, n uint64) {
	if n > 0 {
		o.uint("bytesReused", n)
	}
}
