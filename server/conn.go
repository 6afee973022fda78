package server

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// clientConn is one DNBD3 client connection after the protocol was
// detected.
type clientConn struct {
	srv  *Server
	c    net.Conn
	s    *sock          // c's reads and writes
	r    *bufio.Reader  // buffered reads from s
	addr netip.AddrPort // remote address
	self netip.AddrPort // local address (never announced to the client)
	log  *slog.Logger

	img       *image // selected image (nil until the handshake succeeded)
	isServer  atomic.Bool
	bytesSent atomic.Uint64
	timeout   time.Duration // clientTimeout at the handshake (set before any reply)

	lastHandle uint64 // handle of the last GET_BLOCK (reply quirk)
	queued     bool   // replies may be queued in out (request loop only)
	readBy     time.Time

	// Replies come from the request loop and, for requests relayed to an
	// uplink, from the goroutines that receive the data: every reply is
	// written whole under wmu.
	wmu     sync.Mutex
	writeBy time.Time // guarded by wmu
	dead    bool      // guarded by wmu: no more replies (the loop left)
	out     *[]byte   // guarded by wmu: queued replies (batch.go), nil if none

	relays    atomic.Int32  // relayed requests not answered yet
	relayDone chan struct{} // cap 1: a relayed request was answered

	nbd atomic.Bool // switched to the NBD transmission protocol (nbdmode.go)

	stats connStats // Prometheus counters (metrics.go)
}

// serveDNBD3 runs the handshake and the request loop.
func (cc *clientConn) serveDNBD3() {
	outcome := hsMalformed // counted when the handshake fails (-1: counted as ok)
	defer func() {
		if outcome >= 0 {
			cc.srv.met.handshake(outcome)
		}
	}()
	var first [protocol.RequestSize]byte
	if _, err := io.ReadFull(cc.r, first[:]); err != nil {
		cc.logAt(slog.LevelDebug, "closing: incomplete first header", "err", err)
		return
	}
	req, err := protocol.ParseRequest(first[:])
	if err != nil || req.Cmd != protocol.CmdSelectImage || req.Size > protocol.MaxPayload {
		cc.logAt(slog.LevelDebug, "closing: first message is not a select image request", "err", err, "cmd", req.Cmd)
		return
	}
	payload := make([]byte, req.Size)
	if _, err := io.ReadFull(cc.r, payload); err != nil {
		cc.logAt(slog.LevelDebug, "closing: select image payload", "err", err)
		return
	}
	sel, err := protocol.ParseSelectImage(payload)
	if err != nil || sel.Version < protocol.MinClientVersion {
		cc.logAt(slog.LevelDebug, "closing: bad select image", "err", err, "version", sel.Version)
		return
	}
	img, err := cc.srv.selectImage(sel)
	if err != nil {
		outcome = hsUnavailable
		cc.logAt(slog.LevelInfo, "closing: image not available", "image", sel.Name, "rid", sel.RID, "err", err)
		return
	}
	defer cc.srv.store.Release(img)
	cc.img = img
	cc.isServer.Store(sel.Flags&protocol.FlagServer != 0)
	cfg := cc.srv.config()
	cc.timeout = cfg.ClientTimeout
	cc.relayDone = make(chan struct{}, 1)
	// After the loop: no relay goroutine writes to the connection or reads
	// the image file on its behalf once Release may have closed it.
	defer cc.dropQueued()
	defer cc.markDead()
	if err := cc.srv.proxyPenalty(img); err != nil {
		outcome = hsRefused
		cc.logAt(slog.LevelDebug, "closing: "+err.Error(), "image", img)
		return
	}

	version := min(sel.Version, protocol.Version)
	reply := protocol.SelectImageReply{Version: version, Name: img.Name, RID: img.RID, Size: uint64(img.VirtualSize),
		Features: cc.features(sel.Flags)}
	if err := cc.sendReply(protocol.CmdSelectImage, 0, reply.Marshal()); err != nil {
		outcome = hsAborted
		return
	}
	cc.srv.met.handshake(hsOK)
	outcome = -1
	penalty := cfg.ClientPenalty
	if cc.isServer.Load() {
		penalty = cfg.ServerPenalty
	}
	if penalty > 0 {
		time.Sleep(penalty)
	}
	cc.srv.addClient(cc)
	defer cc.srv.removeClient(cc)
	cc.logAt(slog.LevelDebug, "client selected image", "image", img, "server", cc.isServer.Load())
	cc.requestLoop(cc.timeout)
}

// requestLoop reads and answers requests in order until the client leaves,
// sends garbage or stays idle for four client timeouts.
func (cc *clientConn) requestLoop(timeout time.Duration) {
	r := cc.r
	var hdr [protocol.RequestSize]byte
	for {
		if !cc.readyToRead(len(hdr), 4*timeout) {
			return
		}
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if !isClosedErr(err) {
				cc.logAt(slog.LevelDebug, "closing: read request", "err", err)
			}
			return
		}
		req, err := protocol.ParseRequest(hdr[:])
		if err != nil {
			cc.logAt(slog.LevelDebug, "closing: bad request header", "err", err)
			return
		}
		cc.stats.count(reqSlot(req.Cmd))
		if req.Cmd != protocol.CmdGetBlock && req.Size > protocol.MaxPayload {
			cc.logAt(slog.LevelDebug, "closing: payload too large", "cmd", req.Cmd, "size", req.Size)
			return
		}
		switch req.Cmd {
		case protocol.CmdGetBlock:
			err = cc.getBlock(req)
		case protocol.CmdGetServers:
			list := selectForClient(cc.srv.alts, cc.addr.Addr(), cc.img.Name, cc.self)
			err = cc.sendReply(protocol.CmdGetServers, cc.lastHandle, protocol.MarshalServerList(list))
		case protocol.CmdKeepalive:
			err = cc.sendReply(protocol.CmdKeepalive, cc.lastHandle, nil)
		case protocol.CmdGetCRC32:
			var p []byte
			if list := cc.img.crcList(); list != nil {
				p = protocol.MarshalCRCList(list)
			}
			err = cc.sendReply(protocol.CmdGetCRC32, cc.lastHandle, p)
		case protocol.CmdSetClientMode:
			cc.isServer.Store(false)
		case protocol.CmdNBDMode:
			var switched bool
			if switched, err = cc.nbdMode(req); switched {
				return // served in NBD mode to its end
			}
		default:
			// LATEST_RID and unknown commands: ignored without a reply. Unlike
			// the reference we consume the announced payload so the stream
			// stays in sync.
			cc.logAt(slog.LevelDebug, "ignoring command", "cmd", req.Cmd, "size", req.Size)
			if err = cc.flush(); err == nil {
				if _, err := io.CopyN(io.Discard, r, int64(req.Size)); err != nil {
					return
				}
			}
		}
		if err != nil {
			cc.logWriteErr(err)
			return
		}
	}
}

// readyToRead prepares the read of the next request header (hdrSize
// bytes): when the loop is about to wait, for the client or for relayed
// requests, the queued replies go first; the read deadline moves to
// idle from now (none if idle is 0); and while too many relayed requests
// are outstanding it waits for them. It reports false when the
// connection is to end (logged).
func (cc *clientConn) readyToRead(hdrSize int, idle time.Duration) bool {
	wait := cc.r.Buffered() < hdrSize
	tooMany := cc.relays.Load() > maxClientRelays
	if wait || tooMany {
		if err := cc.flush(); err != nil {
			cc.logWriteErr(err)
			return false
		}
	}
	if wait && idle > 0 {
		cc.refreshReadDeadline(idle)
	}
	if tooMany && !cc.waitRelays(cc.timeout) {
		cc.logAt(slog.LevelInfo, "closing: too many outstanding relayed requests for too long", "outstanding", cc.relays.Load())
		return false
	}
	return true
}

// logWriteErr logs why the request loop ends after a failed reply.
func (cc *clientConn) logWriteErr(err error) {
	var ref *refusal
	switch {
	case errors.As(err, &ref):
		cc.logAt(slog.LevelInfo, "closing: "+ref.msg, ref.args...)
	case !isClosedErr(err):
		cc.logAt(slog.LevelDebug, "closing: write reply", "err", err)
	}
}

// maxClientRelays is the number of outstanding relayed requests above
// which the server stops reading a client's requests.
const maxClientRelays = 250

// waitRelays waits until at most maxClientRelays relayed requests are
// outstanding. It reports false if none completed within timeout.
func (cc *clientConn) waitRelays(timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for cc.relays.Load() > maxClientRelays {
		select {
		case <-cc.relayDone:
			t.Reset(timeout)
		case <-t.C:
			return false
		}
	}
	return true
}

// refusal is an error that ends a client connection on purpose (a request
// the server refuses to relay); the request loop logs it at info level.
type refusal struct {
	msg  string
	args []any
}

func (r *refusal) Error() string { return r.msg }

func refuse(msg string, args ...any) error {
	return &refusal{msg: msg, args: args}
}

// getBlock answers one GET_BLOCK: CMD_ERROR for a range outside the image
// (the connection stays usable), else the data.
func (cc *clientConn) getBlock(req protocol.Request) error {
	img := cc.img
	cc.lastHandle = req.Handle
	end := req.Offset + uint64(req.Size)
	if req.Offset >= uint64(img.VirtualSize) || end > uint64(img.VirtualSize) {
		cc.logAt(slog.LevelDebug, "out of range request", "offset", req.Offset, "size", req.Size, "imageSize", img.VirtualSize)
		return cc.sendReply(protocol.CmdError, req.Handle, nil)
	}
	img.touch()
	if img.cache.Load() != nil || img.hasBad.Load() {
		return cc.getBlockSlow(req)
	}
	return cc.diskReply(req.Handle, int64(req.Offset), req.Size)
}

// getBlockSlow answers a GET_BLOCK of an image that is incomplete or has
// hash blocks that failed their check: present data comes from the file,
// the rest is relayed to the uplink (proxy) or refused with CMD_ERROR.
func (cc *clientConn) getBlockSlow(req protocol.Request) error {
	img := cc.img
	start, end := int64(req.Offset), int64(req.Offset)+int64(req.Size)
	switch img.locate(start, end) {
	case inBad:
		// Safe behaviour of a server that cannot repair: never serve data
		// known to be corrupt; the client may try another server.
		cc.logAt(slog.LevelDebug, "refusing read of a hash block that failed its check", "image", img, "offset", start, "size", req.Size)
		return cc.sendReply(protocol.CmdError, req.Handle, nil)
	case inFile:
		return cc.diskReply(req.Handle, start, req.Size)
	}
	return cc.relay(req)
}

// sendFromFile answers a GET_BLOCK with size bytes of the image file at
// off at once, without a copy on sockets (sock.sendFile); queued replies
// go first.
func (cc *clientConn) sendFromFile(handle uint64, off int64, size uint32) error {
	cc.countSent(size)
	if !cc.lockWrite() {
		return net.ErrClosed
	}
	defer cc.wmu.Unlock()
	if err := cc.flushLocked(); err != nil {
		return err
	}
	return cc.sendFileLocked(handle, off, size)
}

// sendFileLocked is sendFromFile with wmu held and the bytes counted.
func (cc *clientConn) sendFileLocked(handle uint64, off int64, size uint32) error {
	img := cc.img
	var hdr [protocol.ReplySize]byte
	cc.putBlockHeader(hdr[:], handle, size)
	if size == 0 {
		return cc.s.write(hdr[:], nil)
	}
	return cc.s.sendFile(hdr[:], img.file, img.fd, img.RealSize, off, int64(size))
}

// countSent counts the bytes of a GET_BLOCK reply before the data leaves,
// so that a client that got its reply sees it in the statistics.
func (cc *clientConn) countSent(size uint32) {
	cc.bytesSent.Add(uint64(size))
	cc.srv.bytesSent.Add(uint64(size))
}

// sendData answers a GET_BLOCK with data from memory (a relayed request).
func (cc *clientConn) sendData(handle uint64, data []byte) error {
	var hdr [protocol.ReplySize]byte
	cc.putBlockHeader(hdr[:], handle, uint32(len(data)))
	cc.countSent(uint32(len(data)))
	return cc.send(hdr[:], data)
}

// sendReply writes a reply header and its payload.
func (cc *clientConn) sendReply(cmd protocol.Cmd, handle uint64, payload []byte) error {
	var hdr [protocol.ReplySize]byte
	rep := protocol.Reply{Cmd: cmd, Size: uint32(len(payload)), Handle: handle}
	rep.MarshalTo(hdr[:])
	return cc.send(hdr[:], payload)
}

// send writes a reply header and its payload after the queued replies.
func (cc *clientConn) send(hdr, payload []byte) error {
	if !cc.lockWrite() {
		return net.ErrClosed
	}
	defer cc.wmu.Unlock()
	if err := cc.flushLocked(); err != nil {
		return err
	}
	return cc.s.write(hdr, payload)
}

// lockWrite takes the write lock and refreshes the write deadline. It
// returns false (without the lock) once the connection is dead.
func (cc *clientConn) lockWrite() bool {
	cc.wmu.Lock()
	if cc.dead {
		cc.wmu.Unlock()
		return false
	}
	cc.refreshWriteDeadline(cc.timeout)
	return true
}

// markDead stops all further replies on the connection.
func (cc *clientConn) markDead() {
	cc.wmu.Lock()
	cc.dead = true
	cc.wmu.Unlock()
}

// failRelayed answers a relayed request that cannot be served with
// CMD_ERROR and shuts the connection down, as the reference does when an
// uplink request is cancelled.
func (cc *clientConn) failRelayed(handle uint64) {
	if cc.nbd.Load() {
		// No error reply in NBD mode (the application would get EIO): the
		// kernel re-sends the request on another connection.
		cc.markDead()
		cc.c.Close()
		return
	}
	if cc.lockWrite() {
		rep := protocol.Reply{Cmd: protocol.CmdError, Handle: handle}.Marshal()
		if cc.flushLocked() == nil {
			cc.s.write(rep[:], nil)
		}
		cc.dead = true
		cc.wmu.Unlock()
	}
	cc.c.Close()
}

// refreshReadDeadline moves the read deadline to now+d, but only every few
// seconds: deadlines are not free and pipelined requests come fast.
func (cc *clientConn) refreshReadDeadline(d time.Duration) {
	now := time.Now()
	if cc.readBy.Sub(now) < d-d/8 {
		cc.readBy = now.Add(d)
		cc.c.SetReadDeadline(cc.readBy)
	}
}

// refreshWriteDeadline is called with wmu held.
func (cc *clientConn) refreshWriteDeadline(d time.Duration) {
	now := time.Now()
	if cc.writeBy.Sub(now) < d-d/8 {
		cc.writeBy = now.Add(d)
		cc.c.SetWriteDeadline(cc.writeBy)
	}
}

// logAt logs with the client's address attached, skipping the work when the
// level is disabled (most of these are debug messages on hot paths).
func (cc *clientConn) logAt(level slog.Level, msg string, args ...any) {
	if !cc.log.Enabled(context.Background(), level) {
		return
	}
	cc.log.Log(context.Background(), level, msg, append([]any{"client", cc.addr.String()}, args...)...)
}
