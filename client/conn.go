package client

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// conn is the active connection: a sender goroutine writes the queued
// request headers, a receiver goroutine reads replies, matches GET_BLOCK
// and ERROR replies by handle and everything else by command. Fields
// without a comment are guarded by Image.mu.
type conn struct {
	img *Image
	srv *server
	nc  net.Conn
	br  *bufio.Reader // receiver only

	sendq    []protocol.Request
	wakeSend chan struct{} // cap 1
	quit     chan struct{} // closed by kill
	dead     bool
	inflight int       // GET_BLOCKs sent and not yet answered (incl. abandoned)
	served   bool      // a GET_BLOCK was answered with data
	oldProto bool      // server speaks protocol < 3: hop byte must be 0
	kaSent   time.Time // outstanding KEEPALIVE, zero if none
	since    time.Time // adoption time

	lastRecv atomic.Int64 // unix nanoseconds of the last reply header
}

// signal wakes the sender.
func (c *conn) signal() {
	select {
	case c.wakeSend <- struct{}{}:
	default:
	}
}

// kill closes the connection; its goroutines exit. Caller holds Image.mu.
func (c *conn) kill() {
	if c.dead {
		return
	}
	c.dead = true
	close(c.quit)
	c.nc.Close()
}

// adoptLocked makes d the active connection, starts its goroutines and
// re-sends every unanswered request on it. A previous active connection
// is closed; its requests move to the new one.
func (i *Image) adoptLocked(d *dialed, reason string) {
	now := time.Now()
	if i.closed {
		d.close()
		return
	}
	if old := i.active; old != nil {
		i.active = nil
		i.dropLocked(old, nil, now)
	}
	if i.pinned != nil && i.pinned != d.srv {
		i.pinned = nil // the pinned server failed: probing chooses again
	}
	c := &conn{
		img:      i,
		srv:      d.srv,
		nc:       d.nc,
		br:       d.br,
		wakeSend: make(chan struct{}, 1),
		quit:     make(chan struct{}),
		since:    now,
		oldProto: d.reply.Version < 3,
	}
	c.lastRecv.Store(now.UnixNano())
	d.srv.hsRTT = d.hsRTT
	d.srv.consec = 0
	i.active = c
	i.panicSince = time.Time{}
	i.failedRounds = 0
	i.probeAt = time.Time{} // restart probing relative to this connection
	i.keepaliveAt = now.Add(i.cfg.KeepaliveInterval)
	i.wg.Add(2)
	go c.sendLoop()
	go c.recvLoop()
	if !i.cfg.Sticky {
		c.sendq = append(c.sendq, protocol.Request{Cmd: protocol.CmdGetServers})
	}
	// Everything still pending and not in the queue belongs to a dead
	// connection: send it here first, oldest first.
	var orphans []*request
	for _, r := range i.pending {
		if r.state == statePending && r.conn != nil && r.conn.dead {
			orphans = append(orphans, r)
		}
	}
	i.requeueLocked(orphans, now)
	i.dispatchLocked(now)
	c.signal()
	if i.crcWait != nil && i.crcWait.conn == nil {
		i.sendCRCRequestLocked(c)
	}
	i.log.Debug("dnbd3: active connection", "server", c.srv.key, "reason", reason, "sent", c.inflight, "queued", len(i.waitq)-i.wqHead)
	i.poke()
}

// dropLocked closes c and moves its unanswered requests back to the
// queue. A non-nil err is a failure that is charged to the server; if c
// was the active connection the Image enters panic mode and fails over.
func (i *Image) dropLocked(c *conn, err error, now time.Time) {
	if c.dead {
		return
	}
	c.kill()
	var moved []*request
	for _, r := range i.pending {
		if r.conn == c && r.state == statePending {
			moved = append(moved, r)
		}
	}
	for h, a := range i.abandoned {
		if a.conn == c {
			delete(i.abandoned, h)
		}
	}
	if w := i.crcWait; w != nil && w.conn == c {
		w.conn = nil // re-sent on the next connection
	}
	if err != nil {
		c.srv.fail(err, now)
		i.lastError = err
		i.srvErrors.Add(1)
	}
	if i.active == c {
		i.active = nil
		if !i.closed {
			i.panicSince = now
			// Fail over at once, unless connections keep failing before
			// they deliver any data (a server that accepts the handshake
			// but cannot serve): then back off like a failed round.
			if !c.served {
				i.growFailoverBackoff()
			}
			i.failoverAt = now.Add(i.failoverBackoff)
			i.probeRounds = 0
			i.log.Warn("dnbd3: connection lost, failing over", "server", c.srv.key, "err", err, "pending", len(i.pending))
		}
		i.poke()
	}
	i.requeueLocked(moved, now)
}

// failConn is dropLocked for the connection's own goroutines.
func (i *Image) failConn(c *conn, err error) {
	i.mu.Lock()
	i.dropLocked(c, err, time.Now())
	i.mu.Unlock()
}

func (c *conn) sendLoop() {
	i := c.img
	defer i.wg.Done()
	buf := make([]byte, 0, 64*protocol.RequestSize)
	var batch []protocol.Request
	for {
		select {
		case <-c.wakeSend:
		case <-c.quit:
			return
		}
		i.mu.Lock()
		if c.dead {
			i.mu.Unlock()
			return
		}
		batch, c.sendq = c.sendq, batch[:0]
		i.mu.Unlock()
		if len(batch) == 0 {
			continue
		}
		buf = buf[:0]
		for k := range batch {
			buf = append(buf, make([]byte, protocol.RequestSize)...)
			batch[k].MarshalTo(buf[len(buf)-protocol.RequestSize:])
		}
		if _, err := c.nc.Write(buf); err != nil {
			i.failConn(c, fmt.Errorf("send to %s: %w", c.srv.key, err))
			return
		}
	}
}

// maxControlPayload bounds the payload of KEEPALIVE, GET_SERVERS and
// unknown replies the receiver accepts (they are drained).
const maxControlPayload = protocol.MaxPayload

func (c *conn) recvLoop() {
	i := c.img
	defer i.wg.Done()
	var hb [protocol.ReplySize]byte
	for {
		if _, err := io.ReadFull(c.br, hb[:]); err != nil {
			i.failConn(c, c.readErr(err))
			return
		}
		c.lastRecv.Store(time.Now().UnixNano())
		rep, err := protocol.ParseReply(hb[:])
		if err != nil {
			i.failConn(c, fmt.Errorf("%w from %s: %w", ErrProtocol, c.srv.key, err))
			return
		}
		switch rep.Cmd {
		case protocol.CmdGetBlock, protocol.CmdError:
			err = c.blockReply(rep)
		case protocol.CmdKeepalive:
			err = c.drain(rep, maxControlPayload)
			i.mu.Lock()
			c.kaSent = time.Time{}
			i.mu.Unlock()
		case protocol.CmdGetServers:
			err = c.serversReply(rep)
		case protocol.CmdGetCRC32:
			err = c.crcReply(rep)
		default:
			err = c.drain(rep, maxControlPayload)
		}
		if err != nil {
			i.failConn(c, err)
			return
		}
	}
}

func (c *conn) readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("server %s closed the connection: %w", c.srv.key, err)
	}
	return fmt.Errorf("receive from %s: %w", c.srv.key, err)
}

// drain discards a reply payload of at most max bytes.
func (c *conn) drain(rep protocol.Reply, max uint32) error {
	if rep.Size > max {
		return fmt.Errorf("%w: %s sent a %v reply with %d payload bytes", ErrProtocol, c.srv.key, rep.Cmd, rep.Size)
	}
	if rep.Size == 0 {
		return nil
	}
	if _, err := c.br.Discard(int(rep.Size)); err != nil {
		return c.readErr(err)
	}
	return nil
}

// blockReply handles GET_BLOCK and ERROR replies, which carry the handle
// of their request. The payload is read straight into the caller's buffer.
func (c *conn) blockReply(rep protocol.Reply) error {
	i := c.img
	i.mu.Lock()
	if c.dead {
		i.mu.Unlock()
		return errors.New("client: connection closed")
	}
	r := i.pending[rep.Handle]
	if r == nil || r.conn != c || r.state != statePending {
		a, ok := i.abandoned[rep.Handle]
		if !ok || a.conn != c {
			i.mu.Unlock()
			return fmt.Errorf("%w: %s sent a %v reply for unknown handle %#x", ErrProtocol, c.srv.key, rep.Cmd, rep.Handle)
		}
		delete(i.abandoned, rep.Handle)
		c.inflight--
		i.dispatchLocked(time.Now())
		i.mu.Unlock()
		if rep.Cmd == protocol.CmdError {
			return c.drain(rep, maxControlPayload)
		}
		if rep.Size != a.size {
			return fmt.Errorf("%w: %s answered a %d-byte read with %d bytes", ErrProtocol, c.srv.key, a.size, rep.Size)
		}
		return c.drain(rep, rep.Size)
	}
	if rep.Cmd == protocol.CmdError {
		// In range (reads are clipped), so the server cannot serve it now
		// (e.g. a proxy whose uplink failed): retry elsewhere.
		i.mu.Unlock()
		c.drain(rep, maxControlPayload)
		i.log.Warn("dnbd3: server answered a read with CMD_ERROR, retrying on another connection",
			"server", c.srv.key, "offset", r.off, "size", len(r.buf))
		return fmt.Errorf("%w: %s, read of %d bytes at %d", ErrServerError, c.srv.key, len(r.buf), r.off)
	}
	if rep.Size != uint32(len(r.buf)) {
		i.mu.Unlock()
		return fmt.Errorf("%w: %s answered a %d-byte read with %d bytes", ErrProtocol, c.srv.key, len(r.buf), rep.Size)
	}
	delete(i.pending, r.handle)
	r.state = stateReceiving
	i.mu.Unlock()

	err := c.readPayload(r.buf)

	now := time.Now()
	i.mu.Lock()
	c.inflight--
	if err != nil {
		if r.cancelled || i.closed {
			r.state = statePending
			i.finishLocked(r, ErrClosed)
		} else {
			r.state = statePending
			i.pending[r.handle] = r
			if c.dead {
				i.requeueLocked([]*request{r}, now)
			}
		}
		i.unlock()
		return c.readErr(err)
	}
	c.srv.addLive(now.Sub(r.sent))
	if !c.served {
		c.served = true
		i.failoverBackoff = 0 // this server works: the next failure fails over at once
	}
	i.bytesRead.Add(uint64(len(r.buf)))
	i.nreqs.Add(1)
	i.finishLocked(r, nil) // r may be recycled from here on
	i.dispatchLocked(now)
	i.unlock() // runs an asynchronous read's ReadDone
	return nil
}

// serversReply merges the servers of a GET_SERVERS reply into the list.
func (c *conn) serversReply(rep protocol.Reply) error {
	if rep.Size > maxControlPayload {
		return fmt.Errorf("%w: %s sent a GET_SERVERS reply of %d bytes", ErrProtocol, c.srv.key, rep.Size)
	}
	p := make([]byte, rep.Size)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return c.readErr(err)
	}
	if c.img.cfg.Sticky {
		return nil
	}
	c.img.learnServers(protocol.ParseServerList(p))
	return nil
}

// payloadChunk is how much of a payload is read before the receiver notes
// progress, so a large reply on a slow link does not look like a stall.
const payloadChunk = 256 << 10

// readPayload reads exactly len(p) bytes into p.
func (c *conn) readPayload(p []byte) error {
	for len(p) > 0 {
		n := min(len(p), payloadChunk)
		if _, err := io.ReadFull(c.br, p[:n]); err != nil {
			return err
		}
		p = p[n:]
		if len(p) > 0 {
			c.lastRecv.Store(time.Now().UnixNano())
		}
	}
	return nil
}
