package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// identity is what a server must report in its SELECT_IMAGE reply.
type identity struct {
	name string
	rid  uint16 // 0: any (first connection with rid 0)
	size uint64 // 0: any (first connection)
}

// dialed is a connection whose handshake succeeded.
type dialed struct {
	srv   *server
	nc    net.Conn
	br    *bufio.Reader
	reply protocol.SelectImageReply
	hsRTT time.Duration // dial start to SELECT_IMAGE reply
	rtt   time.Duration // probe: dial start to the end of the 4 KiB block
}

func (d *dialed) close() {
	if d != nil && d.nc != nil {
		d.nc.Close()
	}
}

// readerSize is the bufio buffer of a connection's receiver. Payloads of
// at least this size mostly bypass it and land in the caller's buffer.
const readerSize = 64 << 10

// handshake connects to srv and performs SELECT_IMAGE for want with the
// given flags. The whole exchange is bounded by timeout and ctx. The
// connection is returned without deadlines.
func handshake(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), srv *server, want identity, flags uint8, timeout time.Duration) (*dialed, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	nc, err := dial(ctx, "tcp", srv.key)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	stop := watchConn(ctx, nc)
	sel, br, err := selectImage(nc, want, flags, readerSize)
	if !stop() || err != nil {
		nc.Close()
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("SELECT_IMAGE: %w", context.Cause(ctx))
		}
		return nil, err
	}
	return &dialed{srv: srv, nc: nc, br: br, reply: sel, hsRTT: time.Since(start)}, nil
}

// watchConn makes blocking I/O on nc fail when ctx ends. The returned
// function stops the watch; it reports false if ctx already interrupted nc.
func watchConn(ctx context.Context, nc net.Conn) func() bool {
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	return stop
}

// SelectImage performs the SELECT_IMAGE exchange on nc, a new connection
// to a DNBD3 server, for tools that speak the protocol themselves (such as
// dnbd3-bench): it asks for image name at revision rid (0: the latest)
// with the given flags and checks the reply as Open does. Everything the
// server sends after the reply must be read through the returned reader,
// which buffers bufSize bytes of nc. Deadlines on nc are up to the caller.
func SelectImage(nc net.Conn, name string, rid uint16, flags uint8, bufSize int) (protocol.SelectImageReply, *bufio.Reader, error) {
	return selectImage(nc, identity{name: name, rid: rid}, flags, bufSize)
}

func selectImage(nc net.Conn, want identity, flags uint8, bufSize int) (protocol.SelectImageReply, *bufio.Reader, error) {
	var none protocol.SelectImageReply
	payload := protocol.SelectImage{Version: protocol.Version, Name: want.name, RID: want.rid, Flags: flags}.Marshal()
	hdr := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(payload))}.Marshal()
	if _, err := nc.Write(append(hdr[:], payload...)); err != nil {
		return none, nil, fmt.Errorf("send SELECT_IMAGE: %w", err)
	}
	br := bufio.NewReaderSize(nc, bufSize)
	var rb [protocol.ReplySize]byte
	if _, err := io.ReadFull(br, rb[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isConnReset(err) {
			return none, nil, errClosedInHandshake
		}
		return none, nil, fmt.Errorf("read SELECT_IMAGE reply: %w", err)
	}
	rep, err := protocol.ParseReply(rb[:])
	if err != nil {
		return none, nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	if rep.Cmd != protocol.CmdSelectImage {
		return none, nil, fmt.Errorf("%w: reply command %v, want SELECT_IMAGE", ErrHandshake, rep.Cmd)
	}
	if rep.Size < 3 || rep.Size > protocol.MaxPayload {
		return none, nil, fmt.Errorf("%w: reply payload of %d bytes (want 3..%d)", ErrHandshake, rep.Size, protocol.MaxPayload)
	}
	p := make([]byte, rep.Size)
	if _, err := io.ReadFull(br, p); err != nil {
		return none, nil, fmt.Errorf("read SELECT_IMAGE reply payload: %w", err)
	}
	sel, err := protocol.ParseSelectImageReply(p)
	if err != nil {
		return none, nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	if err := checkReply(sel, want); err != nil {
		return none, nil, err
	}
	return sel, br, nil
}

// checkReply applies the reference clients' validation of a SELECT_IMAGE
// reply, plus the identity check for additional servers.
func checkReply(sel protocol.SelectImageReply, want identity) error {
	switch {
	case sel.Version < protocol.MinServerVersion:
		return fmt.Errorf("%w: server speaks protocol version %d, need >= %d", ErrHandshake, sel.Version, protocol.MinServerVersion)
	case sel.RID == 0:
		return fmt.Errorf("%w: server reported revision 0", ErrHandshake)
	case sel.Size < protocol.BlockSize || sel.Size%protocol.BlockSize != 0 || sel.Size >= protocol.MaxOffset:
		return fmt.Errorf("%w: server reported image size %d (must be a non-zero multiple of %d)", ErrHandshake, sel.Size, protocol.BlockSize)
	case want.rid != 0 && sel.RID != want.rid:
		return fmt.Errorf("%w: server has revision %d, want %d", ErrHandshake, sel.RID, want.rid)
	case want.size != 0 && sel.Name != want.name:
		return fmt.Errorf("%w: server calls the image %q, want %q", ErrHandshake, sel.Name, want.name)
	case want.size != 0 && sel.Size != want.size:
		return fmt.Errorf("%w: server reports size %d, want %d", ErrHandshake, sel.Size, want.size)
	}
	return nil
}

// probeBlock is the size of the block an RTT probe reads at offset 0.
const probeBlock = protocol.BlockSize

// probe measures srv: connect, SELECT_IMAGE, GET_BLOCK 4096 @ 0 with
// handle 0, all within timeout. d.rtt is the connect-to-data time. On
// success the connection stays open so it can become the active one.
func probe(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), srv *server, want identity, flags uint8, timeout time.Duration) (*dialed, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d, err := handshake(ctx, dial, srv, want, flags, timeout)
	if err != nil {
		return nil, err
	}
	stop := watchConn(ctx, d.nc)
	err = probeRead(d)
	if !stop() || err != nil {
		d.close()
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("probe read: %w", context.Cause(ctx))
		}
		return nil, err
	}
	d.rtt = time.Since(start)
	return d, nil
}

func probeRead(d *dialed) error {
	hdr := protocol.Request{Cmd: protocol.CmdGetBlock, Size: probeBlock, Offset: 0, Handle: 0}.Marshal()
	if _, err := d.nc.Write(hdr[:]); err != nil {
		return fmt.Errorf("send probe GET_BLOCK: %w", err)
	}
	var rb [protocol.ReplySize]byte
	if _, err := io.ReadFull(d.br, rb[:]); err != nil {
		return fmt.Errorf("read probe reply: %w", err)
	}
	rep, err := protocol.ParseReply(rb[:])
	if err != nil {
		return fmt.Errorf("%w: probe reply: %w", ErrProtocol, err)
	}
	if rep.Cmd != protocol.CmdGetBlock || rep.Size != probeBlock || rep.Handle != 0 {
		return fmt.Errorf("%w: probe reply %v, want GET_BLOCK size=%d handle=0", ErrProtocol, rep, probeBlock)
	}
	if _, err := d.br.Discard(probeBlock); err != nil {
		return fmt.Errorf("read probe data: %w", err)
	}
	return nil
}

func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
