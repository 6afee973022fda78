package server

// The kernel-direct data path (docs/kernel-direct.md), server side: a
// client that asked with protocol.FlagFeatures learns FeatureNBD in the
// SELECT_IMAGE reply, and CmdNBDMode switches its connection to the NBD
// transmission protocol. dnbd3-nbd attach then hands the socket to the
// kernel's nbd driver, which reads the image from this server with no
// user-space hop on the client. Reference clients never set the flag and
// never see any of this.
//
// After the switch the connection serves NBD READs the way GET_BLOCK is
// served: present data from the image file, small replies batched and
// large ones zero-copy (batch.go, sendfile.go; 16-byte NBD reply header
// instead of the DNBD3 one), absent blocks of a proxy's
// incomplete copy relayed through the uplink, replies out of order,
// matched by cookie. Nothing on this connection may ever answer a read
// with an error the kernel would pass to the application as EIO while
// another server could serve it: where the DNBD3 protocol answers
// CMD_ERROR (a relay that failed, a hash block that failed its check),
// the connection is closed instead; the kernel marks the socket dead,
// its daemon replaces it and the kernel re-sends the request.

import (
	"io"
	"log/slog"
	"math/bits"
	"net"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

const (
	// nbdMaxRead bounds an NBD READ (the kernel's largest request is
	// 32 MiB); larger ones get EINVAL.
	nbdMaxRead = 32 << 20
	// nbdKeepAlive is the TCP keepalive of a switched connection: the
	// kernel sends no DNBD3 keepalives, so the idle timeout is off and
	// TCP finds a vanished client instead.
	nbdKeepAlive = 15 * time.Second
)

// features returns the feature mask for a client that sent
// protocol.FlagFeatures in its SELECT_IMAGE.
func (cc *clientConn) features(flags uint8) uint32 {
	if flags&protocol.FlagFeatures == 0 {
		return 0
	}
	return protocol.FeatureNBD
}

// The block reply headers of both protocols have one size, so a batch
// (batch.go) holds either.
var _ = [1]struct{}{}[protocol.ReplySize-protocol.NBDReplySize]

// putBlockHeader writes the header of a successful block reply into
// b[:16]: DNBD3, or NBD once the connection switched (both are 16 bytes).
func (cc *clientConn) putBlockHeader(b []byte, handle uint64, size uint32) {
	if cc.nbd.Load() {
		protocol.PutNBDReply(b, 0, handle)
		return
	}
	rep := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: size, Handle: handle}
	rep.MarshalTo(b)
}

// nbdMode handles CmdNBDMode: it refuses with CMD_ERROR (the connection
// stays DNBD3) or switches and serves the connection in NBD mode until it
// ends, reporting switched.
func (cc *clientConn) nbdMode(req protocol.Request) (switched bool, err error) {
	if req.Size > 0 {
		if _, err := io.CopyN(io.Discard, cc.r, int64(req.Size)); err != nil {
			return false, err
		}
	}
	img := cc.img
	cfg := cc.srv.config()
	var why string
	switch {
	case cc.relays.Load() > 0:
		why = "relayed requests outstanding"
	case img.hasBad.Load():
		why = "the image has hash blocks that failed their check"
	case img.cache.Load() != nil && !cfg.IsProxy:
		why = "the image is incomplete and this server is no proxy"
	}
	if why != "" {
		cc.logAt(slog.LevelInfo, "refusing the switch to NBD mode: "+why, "image", img.String())
		return false, cc.sendReply(protocol.CmdError, req.Handle, nil)
	}
	cc.nbd.Store(true)
	rep := protocol.Reply{Cmd: protocol.CmdNBDMode, Handle: req.Handle}.Marshal()
	if cc.send(rep[:], nil) != nil {
		return true, nil
	}
	cc.logAt(slog.LevelDebug, "connection switched to NBD mode", "image", img.String())
	cc.nbdLoop()
	return true, nil
}

// nbdLoop reads and answers NBD requests until the client disconnects,
// sends garbage or a request this connection must not answer.
func (cc *clientConn) nbdLoop() {
	cc.c.SetReadDeadline(time.Time{})
	if tc, ok := cc.c.(*net.TCPConn); ok {
		tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: nbdKeepAlive, Interval: nbdKeepAlive / 3, Count: 3})
	}
	var hdr [protocol.NBDRequestSize]byte
	for {
		if !cc.readyToRead(len(hdr), 0) { // no idle timeout in NBD mode
			return
		}
		if _, err := io.ReadFull(cc.r, hdr[:]); err != nil {
			if !isClosedErr(err) {
				cc.logAt(slog.LevelDebug, "closing NBD connection: read request", "err", err)
			}
			return
		}
		req, err := protocol.ParseNBDRequest(hdr[:])
		if err != nil {
			cc.logAt(slog.LevelDebug, "closing NBD connection: bad request", "err", err)
			return
		}
		if req.Type == protocol.NBDCmdRead {
			cc.stats.count(reqNBDRead)
		} else {
			cc.stats.count(reqNBDOther)
		}
		switch req.Type {
		case protocol.NBDCmdRead:
			err = cc.nbdRead(req)
		case protocol.NBDCmdDisc:
			cc.logAt(slog.LevelDebug, "NBD client disconnected")
			return
		case protocol.NBDCmdFlush:
			err = cc.nbdError(req.Cookie, 0) // read-only: nothing to make durable
		case protocol.NBDCmdWrite:
			if req.Length > nbdMaxRead {
				cc.logAt(slog.LevelDebug, "closing NBD connection: oversized write", "length", req.Length)
				return
			}
			if _, err = io.CopyN(io.Discard, cc.r, int64(req.Length)); err == nil {
				err = cc.nbdError(req.Cookie, protocol.NBDEPERM)
			}
		case protocol.NBDCmdTrim, protocol.NBDCmdWriteZeroes:
			err = cc.nbdError(req.Cookie, protocol.NBDEPERM)
		default:
			err = cc.nbdError(req.Cookie, protocol.NBDEINVAL)
		}
		if err != nil {
			if r, ok := err.(*refusal); ok {
				cc.logAt(slog.LevelInfo, "closing NBD connection: "+r.msg, r.args...)
			} else if !isClosedErr(err) {
				cc.logAt(slog.LevelDebug, "closing NBD connection", "err", err)
			}
			return
		}
	}
}

// nbdRead answers one READ like getBlock answers a GET_BLOCK.
func (cc *clientConn) nbdRead(req protocol.NBDRequest) error {
	img := cc.img
	end, carry := bits.Add64(req.Offset, uint64(req.Length), 0)
	if req.Length > nbdMaxRead || carry != 0 || end > uint64(img.VirtualSize) {
		return cc.nbdError(req.Cookie, protocol.NBDEINVAL)
	}
	if req.Length == 0 {
		return cc.nbdError(req.Cookie, 0)
	}
	img.touch()
	start := int64(req.Offset)
	if img.cache.Load() == nil && !img.hasBad.Load() {
		return cc.diskReply(req.Cookie, start, req.Length)
	}
	switch img.locate(start, int64(end)) {
	case inBad:
		return refuse("NBD read of a hash block that failed its check", "image", img.String(), "offset", start, "size", req.Length)
	case inFile:
		return cc.diskReply(req.Cookie, start, req.Length)
	}
	if !cc.srv.config().IsProxy {
		return refuse("NBD read of blocks an incomplete image does not have; not a proxy", "image", img.String(), "offset", start, "size", req.Length)
	}
	return cc.relay(protocol.Request{Cmd: protocol.CmdGetBlock, Size: req.Length, Offset: req.Offset, Handle: req.Cookie})
}

// nbdError sends a reply without data: errno 0 for a successful FLUSH or
// empty READ, else the error.
func (cc *clientConn) nbdError(cookie uint64, errno uint32) error {
	var b [protocol.NBDReplySize]byte
	protocol.PutNBDReply(b[:], errno, cookie)
	return cc.send(b[:], nil)
}
