package server

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// clientConn is one DNBD3 client connection after the protocol was
// detected.
type clientConn struct {
	srv  *Server
	c    net.Conn
	r    *bufio.Reader  // buffered reads from c
	addr netip.AddrPort // remote address
	self netip.AddrPort // local address (never announced to the client)
	log  *slog.Logger

	img       *Image // selected image (nil until the handshake succeeded)
	isServer  atomic.Bool
	bytesSent atomic.Uint64

	lastHandle uint64 // handle of the last GET_BLOCK (reply quirk)
	readBy     time.Time
	writeBy    time.Time
}

// serveDNBD3 runs the handshake and the request loop.
func (cc *clientConn) serveDNBD3() {
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
	img, err := cc.srv.store.Get(sel.Name, sel.RID)
	if err != nil {
		cc.logAt(slog.LevelInfo, "closing: image not available", "image", sel.Name, "rid", sel.RID, "err", err)
		return
	}
	defer cc.srv.store.Release(img)
	cc.img = img
	cc.isServer.Store(sel.Flags&protocol.FlagServer != 0)

	version := min(sel.Version, protocol.Version)
	reply := protocol.SelectImageReply{Version: version, Name: img.Name, RID: img.RID, Size: uint64(img.VirtualSize)}
	if err := cc.sendReply(protocol.CmdSelectImage, 0, reply.Marshal()); err != nil {
		return
	}
	cfg := cc.srv.config()
	penalty := cfg.ClientPenalty
	if cc.isServer.Load() {
		penalty = cfg.ServerPenalty
	}
	if penalty > 0 {
		time.Sleep(penalty)
	}
	cc.srv.addClient(cc)
	defer cc.srv.removeClient(cc)
	cc.logAt(slog.LevelDebug, "client selected image", "image", img.String(), "server", cc.isServer.Load())
	cc.requestLoop(cfg.ClientTimeout)
}

// requestLoop reads and answers requests in order until the client leaves,
// sends garbage or stays idle for four client timeouts.
func (cc *clientConn) requestLoop(timeout time.Duration) {
	r := cc.r
	var hdr [protocol.RequestSize]byte
	for {
		cc.refreshReadDeadline(4 * timeout)
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
		if req.Cmd != protocol.CmdGetBlock && req.Size > protocol.MaxPayload {
			cc.logAt(slog.LevelDebug, "closing: payload too large", "cmd", req.Cmd, "size", req.Size)
			return
		}
		cc.refreshWriteDeadline(timeout)
		switch req.Cmd {
		case protocol.CmdGetBlock:
			err = cc.getBlock(req)
		case protocol.CmdGetServers:
			list := SelectForClient(cc.srv.alts, cc.addr.Addr(), cc.img.Name, cc.self)
			err = cc.sendReply(protocol.CmdGetServers, cc.lastHandle, protocol.MarshalServerList(list))
		case protocol.CmdKeepalive:
			err = cc.sendReply(protocol.CmdKeepalive, cc.lastHandle, nil)
		case protocol.CmdGetCRC32:
			var p []byte
			if list := cc.img.CRCList(); list != nil {
				p = protocol.MarshalCRCList(list)
			}
			err = cc.sendReply(protocol.CmdGetCRC32, cc.lastHandle, p)
		case protocol.CmdSetClientMode:
			cc.isServer.Store(false)
		default:
			// LATEST_RID and unknown commands: ignored without a reply. Unlike
			// the reference we consume the announced payload so the stream
			// stays in sync.
			cc.logAt(slog.LevelDebug, "ignoring command", "cmd", req.Cmd, "size", req.Size)
			if _, err = io.CopyN(io.Discard, r, int64(req.Size)); err != nil {
				return
			}
		}
		if err != nil {
			if !isClosedErr(err) {
				cc.logAt(slog.LevelDebug, "closing: write reply", "err", err)
			}
			return
		}
	}
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
	img.Touch()
	rep := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: req.Size, Handle: req.Handle}
	var hdr [protocol.ReplySize]byte
	rep.MarshalTo(hdr[:])
	if req.Size == 0 {
		_, err := cc.c.Write(hdr[:])
		return err
	}
	if err := sendReply(cc.c, hdr[:], img.file, img.fd, img.RealSize, int64(req.Offset), int64(req.Size)); err != nil {
		return err
	}
	cc.bytesSent.Add(uint64(req.Size))
	cc.srv.bytesSent.Add(uint64(req.Size))
	return nil
}

// sendReply writes a reply header and its payload in one write.
func (cc *clientConn) sendReply(cmd protocol.Cmd, handle uint64, payload []byte) error {
	// Small and rare (handshake, keepalive, server lists): a heap buffer
	// keeps the goroutine stacks of idle clients small.
	buf := make([]byte, protocol.ReplySize+len(payload))
	rep := protocol.Reply{Cmd: cmd, Size: uint32(len(payload)), Handle: handle}
	rep.MarshalTo(buf)
	copy(buf[protocol.ReplySize:], payload)
	_, err := cc.c.Write(buf)
	return err
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

func (cc *clientConn) refreshWriteDeadline(d time.Duration) {
	now := time.Now()
	if cc.writeBy.Sub(now) < d-d/8 {
		cc.writeBy = now.Add(d)
		cc.c.SetWriteDeadline(cc.writeBy)
	}
}

var errTooManyClients = errors.New("too many clients")

// logAt logs with the client's address attached, skipping the work when the
// level is disabled (most of these are debug messages on hot paths).
func (cc *clientConn) logAt(level slog.Level, msg string, args ...any) {
	if !cc.log.Enabled(context.Background(), level) {
		return
	}
	cc.log.Log(context.Background(), level, msg, append([]any{"client", cc.addr.String()}, args...)...)
}
