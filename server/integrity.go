package server

// Integrity checking: the CRC-32 of 16 MiB hash blocks against the
// image's CRC list (`.crc`).
//
//   - When an image is loaded, its first, its last and one random complete
//     hash block are checked in the background.
//   - A hash block that replication completes is checked.
//   - VerifyAll (SIGUSR1) checks every complete hash block of every image.
//
// A block that fails is logged ("Hash check for block N of NAME failed").
// On a proxy that has an uplink for the image, the block's bits are
// cleared from the cache map (which is saved at once) and the block is
// fetched again. Elsewhere (non-proxy, or no uplink server for the image)
// reads touching the block are answered with CMD_ERROR until a later check
// finds it good again or the image is reloaded: corrupt data is never
// served.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// checkQueueLen is the capacity of the background check queue; checks
// queued while it is full are dropped.
const checkQueueLen = 200

type checkItem struct {
	img *image
	hb  int
}

// checker runs the background hash block checks. Its worker goroutine
// exists only while checks are queued.
type checker struct {
	s  *Server
	wg sync.WaitGroup

	mu      sync.Mutex
	q       []checkItem
	ctx     context.Context // nil until run
	running bool
}

func newChecker(s *Server) *checker { return &checker{s: s} }

// queue schedules a check of hash block hb of img; it is dropped if the
// queue is full or img has no CRC list.
func (c *checker) queue(img *image, hb int) {
	if img.crcList() == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.q) >= checkQueueLen || (c.ctx != nil && c.ctx.Err() != nil) {
		c.s.log.Debug("integrity check queue full, dropping check", "image", img.String(), "block", hb)
		return
	}
	if !img.ref() {
		return
	}
	c.q = append(c.q, checkItem{img, hb})
	c.startLocked()
}

// startLocked starts the worker if checks are queued and run was called.
func (c *checker) startLocked() {
	if c.running || c.ctx == nil || c.ctx.Err() != nil || len(c.q) == 0 {
		return
	}
	c.running = true
	c.wg.Add(1)
	go c.work()
}

// queueLoad schedules the checks of a freshly loaded image: the first,
// the last and one random complete hash block.
func (c *checker) queueLoad(img *image) {
	list := img.crcList()
	if len(list) == 0 {
		return
	}
	n := len(list)
	complete := func(hb int) bool {
		cm := img.cache.Load()
		return cm == nil || cm.hashBlockComplete(hb)
	}
	picked := map[int]bool{}
	for _, hb := range []int{0, n - 1} {
		if !picked[hb] && complete(hb) {
			picked[hb] = true
			c.queue(img, hb)
		}
	}
	if n > 2 {
		start := rand.IntN(n)
		for k := range n {
			hb := (start + k) % n
			if !picked[hb] && complete(hb) {
				c.queue(img, hb)
				break
			}
		}
	}
}

// run lets checks run (queued ones included) until ctx ends.
func (c *checker) run(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ctx = ctx
	c.startLocked()
}

// work checks queued blocks until the queue is empty or ctx ends.
func (c *checker) work() {
	defer c.wg.Done()
	buf := make([]byte, 1<<20)
	for {
		c.mu.Lock()
		if len(c.q) == 0 || c.ctx.Err() != nil {
			for _, it := range c.q {
				it.img.unref()
			}
			c.q = nil
			c.running = false
			c.mu.Unlock()
			return
		}
		it := c.q[0]
		c.q = c.q[1:]
		ctx := c.ctx
		c.mu.Unlock()
		c.s.checkHashBlock(ctx, it.img, it.hb, buf)
		it.img.unref()
	}
}

// wait waits for the worker after run's context ended.
func (c *checker) wait() {
	// startLocked checks the context and adds to wg under mu
	c.mu.Lock()
	c.mu.Unlock()
	c.wg.Wait()
}

// checkHashBlock verifies hash block hb of img if it is complete. It
// reports whether the block failed.
func (s *Server) checkHashBlock(ctx context.Context, img *image, hb int, buf []byte) (bad bool, err error) {
	list := img.crcList()
	if hb < 0 || hb >= len(list) || ctx.Err() != nil {
		return false, ctx.Err()
	}
	if cm := img.cache.Load(); cm != nil && !cm.hashBlockComplete(hb) {
		return false, nil
	}
	got, err := protocol.BlockCRC(img.file, img.RealSize, hb, buf)
	s.met.checks.Add(1)
	if err != nil {
		img.problems.Or(problemRead)
		s.log.Error("cannot read hash block for checking", "image", img.String(), "block", hb, "err", err)
		return false, err
	}
	if got == list[hb] {
		img.markGood(hb)
		return false, nil
	}
	s.log.Error(fmt.Sprintf("Hash check for block %d of %s failed", hb, img.Name), "image", img.String(),
		"crc", fmt.Sprintf("%#08x", got), "want", fmt.Sprintf("%#08x", list[hb]))
	s.met.checkFails.Add(1)
	s.badHashBlock(img, hb)
	return true, nil
}

// badHashBlock handles a failed check: a proxy clears the block from the
// cache map and fetches it again; otherwise reads of it are refused.
func (s *Server) badHashBlock(img *image, hb int) {
	if s.config().IsProxy && len(s.proxy.candidates(img.Name)) > 0 {
		if img.countRepair(hb) > maxRepairs {
			s.log.Error("hash block keeps failing its check after fetching it again; refusing reads of it (the uplink's data or CRC list may be wrong)",
				"image", img.String(), "block", hb)
		} else if s.proxy.invalidate(img, hb) {
			return
		}
	}
	img.markBad(hb)
}

// maxRepairs is how often a proxy fetches a hash block again before it
// gives up on it.
const maxRepairs = 3

// invalidate clears hash block hb from img's cache map (creating one for
// a complete image), saves the map and has the uplink fetch the block
// again. It reports false if that was not possible.
func (p *proxy) invalidate(img *image, hb int) bool {
	start := int64(hb) * protocol.HashBlockSize
	end := min(start+protocol.HashBlockSize, img.VirtualSize)
	if _, err := img.writer(); err != nil {
		p.log.Error("cannot repair hash block: local copy not writable", "image", img.String(), "err", err)
		return false
	}
	img.saveMu.Lock()
	cm := img.cache.Load()
	if cm == nil {
		cm = newFullCacheMap(img.VirtualSize)
	}
	cm.clear(start, end)
	// Clearing bits needs no data sync: the map on disk says less.
	err := cm.saveSynced(func() error { return nil }, p.mapWriter(img.Path+".map"))
	if err == nil {
		img.replica.Store(true)
		img.cache.Store(cm)
	} else {
		p.failSync(img, cm, err)
	}
	img.saveMu.Unlock()
	p.kick()
	if err != nil {
		p.log.Error("cannot save cache map after a failed hash check", "image", img.String(), "err", err)
		return false
	}
	img.markGood(hb)
	p.log.Info("fetching hash block again", "image", img.String(), "block", hb)
	for range 3 {
		up, err := p.ensureUplink(img)
		if err != nil {
			p.log.Warn("no uplink to repair hash block now; it is fetched when read", "image", img.String(), "block", hb, "err", err)
			return true
		}
		if up.repair(start, end, bgrHops(p.cfg())) {
			return true
		}
	}
	return true
}

// VerifyAll checks the CRC-32 of every complete hash block of every loaded
// image (SIGUSR1) and returns the number of images with a CRC list and of
// failed hash blocks. Failed blocks are handled like those of the
// background checks.
func (s *Server) VerifyAll(ctx context.Context) (images, failed int) {
	s.log.Info("verifying checksums of all images")
	buf := make([]byte, 1<<20)
	for _, img := range s.store.list() {
		if ctx.Err() != nil {
			break
		}
		list := img.crcList()
		if list == nil || !img.ref() {
			continue
		}
		images++
		for hb := range list {
			bad, err := s.checkHashBlock(ctx, img, hb, buf)
			if err != nil {
				break
			}
			if bad {
				failed++
			}
		}
		img.unref()
	}
	s.log.Info("checksum verification done", "images", images, "failedBlocks", failed)
	return images, failed
}
