package server

// Clone on demand: a proxy asked for an image it does not have looks it up
// on its uplinks and creates a local copy: the image file at the padded
// (virtual) size, an all-zero `.map`, the `.crc` fetched with GET_CRC32
// and a `.meta`. The connection of the lookup becomes the image's uplink,
// which first copies what it can from the previous revision (reuse.go).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// Errors of upstream lookups.
var (
	// ErrNoUplink means no alt-server may be used as uplink for the image.
	errNoUplink = errors.New("server: no uplink server configured for this image")
	// errLookupBusy refuses a server peer asking for an image whose
	// lookup is already running here: in a cycle of proxies the request
	// came back to us.
	errLookupBusy = errors.New("server: lookup of this image already running (proxy cycle?)")
	// errNoLocalCopy wraps local failures to create the copy of an image
	// found upstream (file system, disk space): the proxy's own problem.
	errNoLocalCopy = errors.New("server: cannot create the local copy")
)

// lookupEntry is a cached lookup result.
type lookupEntry struct {
	rid uint16 // rid 0 lookups: the latest revision upstream
	err error
	at  time.Time
}

// lookupCall is a lookup in progress; other clients wait for it.
type lookupCall struct {
	done chan struct{}
	res  lookupEntry
}

// lookup makes sure image name/rid exists locally, cloning it from the
// uplinks if needed. Results are cached for lookupCacheTTL; concurrent
// lookups of the same image share one (a server peer is refused instead,
// which breaks proxy cycles).
func (p *proxy) lookup(name string, rid uint16, peerServer bool) error {
	return p.cachedLookup(imageKey{name, rid}, peerServer).err
}

// lookupLatest asks the uplinks for the latest revision of name and
// clones it if it is newer than every local one. Failures only mean that
// the local revisions are served.
func (p *proxy) lookupLatest(name string, peerServer bool) {
	p.cachedLookup(imageKey{name, 0}, peerServer)
}

func (p *proxy) cachedLookup(k imageKey, peerServer bool) lookupEntry {
	now := time.Now()
	p.lkMu.Lock()
	if e, ok := p.lkCache[k]; ok && now.Sub(e.at) < lookupCacheTTL && (e.err != nil || k.rid == 0) {
		p.lkMu.Unlock()
		return e
	}
	if c := p.lkCalls[k]; c != nil {
		p.lkMu.Unlock()
		if peerServer {
			return lookupEntry{err: errLookupBusy}
		}
		select {
		case <-c.done:
			return c.res
		case <-p.ctx.Done():
			return lookupEntry{err: p.ctx.Err()}
		}
	}
	c := &lookupCall{done: make(chan struct{})}
	p.lkCalls[k] = c
	p.lkMu.Unlock()

	var res lookupEntry
	if k.rid == 0 {
		res.rid, res.err = p.cloneLatest(k.name)
	} else {
		res.rid, res.err = k.rid, p.cloneRevision(k.name, k.rid)
	}
	res.at = time.Now()
	switch {
	case errors.Is(res.err, errNoLocalCopy):
		p.log.Error("cannot create the local copy of an image: clients asking for it get nothing (check that basePath is writable for the server's user and has room)",
			"image", k.name, "rid", k.rid, "err", res.err)
	case res.err != nil:
		p.log.Info("upstream lookup failed", "image", k.name, "rid", k.rid, "err", res.err)
	}
	p.lkMu.Lock()
	if p.ctx.Err() == nil {
		p.rememberLocked(k, res)
	}
	delete(p.lkCalls, k)
	p.lkMu.Unlock()
	c.res = res
	close(c.done)
	return res
}

// lookupCacheMax bounds the lookup cache: names are up to ~1000 bytes and
// anyone may ask for any number of them.
const lookupCacheMax = 10000

// rememberLocked caches a lookup result, first dropping expired entries
// and, if that is not enough, arbitrary ones (caller holds lkMu).
func (p *proxy) rememberLocked(k imageKey, res lookupEntry) {
	if _, ok := p.lkCache[k]; !ok && len(p.lkCache) >= lookupCacheMax {
		for key, e := range p.lkCache {
			if res.at.Sub(e.at) >= lookupCacheTTL {
				delete(p.lkCache, key)
			}
		}
		for key := range p.lkCache {
			if len(p.lkCache) < lookupCacheMax {
				break
			}
			delete(p.lkCache, key)
		}
	}
	p.lkCache[k] = res
}

// cloneRevision clones name/rid unless it appeared locally meanwhile.
func (p *proxy) cloneRevision(name string, rid uint16) error {
	if p.s.store.loaded(name, rid) != nil || fileExists(p.imagePath(name, rid)) {
		return nil
	}
	ci, err := p.openUpstream(name, rid)
	if err != nil {
		return err
	}
	return p.clone(ci)
}

// cloneLatest asks the uplinks for rid 0 and clones the answer if it is
// newer than the local revisions. It returns the upstream revision.
func (p *proxy) cloneLatest(name string) (uint16, error) {
	ci, err := p.openUpstream(name, 0)
	if err != nil {
		return 0, err
	}
	rid := ci.RID()
	if local := p.s.store.latestRID(name); rid <= local {
		ci.Close()
		return rid, nil
	}
	return rid, p.clone(ci)
}

// clientConfig is the configuration of an uplink connection.
func (p *proxy) clientConfig(name string, rid uint16, servers []string) client.Config {
	cfg := p.cfg()
	var flags uint8
	if !cfg.PretendClient {
		flags = protocol.FlagServer
		if cfg.BackgroundReplication == bgrFull {
			flags |= protocol.FlagBgRep
		}
	}
	to := cfg.UplinkTimeout
	maxReq := min((cfg.MaxPayload+2*protocol.BlockSize-1)&^(protocol.BlockSize-1), 1<<30)
	return client.Config{
		Servers:        servers,
		Image:          name,
		RID:            rid,
		Sticky:         true, // uplinks come from alt-servers only
		SelectFlags:    flags,
		Deadline:       3 * to,
		ConnectTimeout: min(to, 1500*time.Millisecond),
		OpenTimeout:    to,
		OpenStagger:    100 * time.Millisecond,
		StallTimeout:   to,
		MaxRequest:     int(maxReq),
		MaxInflight:    maxClientRelays,
		Logger:         p.log.With("uplink", name),
		Dial:           p.dial,
	}
}

// openUpstream connects to the uplink candidates for name/rid and returns
// the first connection that reports the same name (and rid, unless 0)
// with a size between 4 KiB and maxReplicationSize.
func (p *proxy) openUpstream(name string, rid uint16) (*client.Image, error) {
	servers := p.candidateAddrs(name)
	if len(servers) == 0 {
		return nil, errNoUplink
	}
	cfg := p.cfg()
	for len(servers) > 0 {
		ci, err := client.Open(p.ctx, p.clientConfig(name, rid, servers))
		if err != nil {
			return nil, fmt.Errorf("look up %s rid %d upstream: %w", name, rid, err)
		}
		cur := ci.Stats().Current
		switch {
		case ci.Name() != name || (rid != 0 && ci.RID() != rid):
			p.log.Warn("uplink answered with another image, trying the next", "server", cur,
				"want", name, "rid", rid, "got", ci.Name(), "gotRid", ci.RID())
			ci.Close()
			servers = removeString(servers, cur)
			continue
		case ci.Size() < protocol.BlockSize:
			ci.Close()
			return nil, fmt.Errorf("server: %s rid %d upstream is smaller than 4 KiB", name, ci.RID())
		case ci.Size() > cfg.MaxReplicationSize:
			ci.Close()
			return nil, fmt.Errorf("server: %s rid %d upstream has %d bytes, more than maxReplicationSize=%d", name, ci.RID(), ci.Size(), cfg.MaxReplicationSize)
		}
		return ci, nil
	}
	return nil, fmt.Errorf("look up %s rid %d upstream: %w", name, rid, client.ErrImageNotFound)
}

func removeString(list []string, s string) []string {
	out := list[:0]
	for _, x := range list {
		if x != s {
			out = append(out, x)
		}
	}
	if len(out) == len(list) && len(out) > 0 {
		out = out[1:] // unknown current: drop the first to make progress
	}
	return out
}

func (p *proxy) imagePath(name string, rid uint16) string {
	return imageFilePath(p.cfg().BasePath, name, rid)
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// clone creates the local copy of the image ci is connected to and makes
// ci its uplink. ci is closed on failure.
func (p *proxy) clone(ci *client.Image) error {
	name, rid, size := ci.Name(), ci.RID(), ci.Size()
	path := p.imagePath(name, rid)
	cfg := p.cfg()
	// The previous revision stays (no LRU deletion for the new copy's
	// space) until the uplink has taken it over for reuse (reuse.go).
	defer p.releaseSource(p.reuseSource(name, rid))
	p.cloneMu.Lock()
	err := p.createReplica(ci, path, size, cfg)
	p.cloneMu.Unlock()
	if err != nil {
		ci.Close()
		return fmt.Errorf("%w of %s: %w", errNoLocalCopy, name, err)
	}
	img, err := p.s.getImage(name, rid)
	if err != nil {
		ci.Close()
		return fmt.Errorf("load the new local copy of %s: %w", name, err)
	}
	defer p.s.store.Release(img)
	p.attachUplink(img, ci)
	p.log.Info("replicating image from uplink", "image", img.String(), "size", size,
		"server", ci.Stats().Current, "crc", img.crcList() != nil)
	return nil
}

// createReplica makes the files of a new local copy. The image file
// appears last, under its final name, so the store never loads it without
// its `.map` and `.crc`.
func (p *proxy) createReplica(ci *client.Image, path string, size int64, cfg *Config) error {
	if fileExists(path) {
		return nil // another lookup won
	}
	if err := checkDirs(cfg.BasePath, ci.Name()); err != nil {
		return fmt.Errorf("no local copy of %s: %w", ci.Name(), err)
	}
	sparse := cfg.SparseFiles
	if err := p.ensureDiskSpace(size, sparse); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create directory for %s: %w", path, err)
	}
	ctx, cancel := context.WithTimeout(p.ctx, cfg.UplinkTimeout)
	list, err := ci.CRCList(ctx)
	cancel()
	if err != nil {
		p.log.Warn("ignoring CRC list from uplink", "image", ci.Name(), "rid", ci.RID(), "err", err)
		list = nil
	}
	if err := fsutil.WriteFileAtomic(path+".map", make([]byte, mapLen(size)), 0o644); err != nil {
		return err
	}
	cleanup := func() {
		os.Remove(path + ".map")
		os.Remove(path + ".crc")
		os.Remove(path + ".meta")
	}
	if list != nil {
		if err := fsutil.WriteFileAtomic(path+".crc", protocol.MarshalCRCList(list), 0o644); err != nil {
			cleanup()
			return err
		}
	} else {
		os.Remove(path + ".crc") // a stale list of an earlier attempt
	}
	if err := writeMeta(path, time.Now()); err != nil {
		cleanup()
		return err
	}
	allocErr, err := createImageFile(path, size, sparse, cfg.IgnoreAllocErrors)
	if errors.Is(err, fsutil.ErrDestExists) {
		return nil // appeared meanwhile: whoever made it owns the sidecars
	}
	if err != nil {
		cleanup()
		return err
	}
	if allocErr != nil {
		p.log.Warn("cannot preallocate local copy, continuing with a sparse file (ignoreAllocErrors)", "path", path, "err", allocErr)
	}
	return nil
}
