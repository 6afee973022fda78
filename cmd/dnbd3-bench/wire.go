package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// session is a raw DNBD3 connection after SELECT_IMAGE.
type session struct {
	nc    net.Conn
	br    *bufio.Reader
	reply protocol.SelectImageReply
}

// dialSelect connects to addr and selects the image, all within timeout.
func dialSelect(ctx context.Context, addr, image string, rid uint16, timeout time.Duration, bufSize int) (*session, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d := net.Dialer{KeepAlive: -1} // no keepalive setsockopts: the bench measures the server
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	s, err := selectImage(nc, image, rid, bufSize)
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return s, nil
}

func selectImage(nc net.Conn, image string, rid uint16, bufSize int) (*session, error) {
	p := protocol.SelectImage{Version: protocol.Version, Name: image, RID: rid}.Marshal()
	h := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
	if _, err := nc.Write(append(h[:], p...)); err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(nc, bufSize)
	var rb [protocol.ReplySize]byte
	if _, err := io.ReadFull(br, rb[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("server closed the connection: image %q rid %d not available", image, rid)
		}
		return nil, err
	}
	rep, err := protocol.ParseReply(rb[:])
	if err != nil {
		return nil, err
	}
	if rep.Cmd != protocol.CmdSelectImage || rep.Size < 3 || rep.Size > protocol.MaxPayload {
		return nil, fmt.Errorf("bad SELECT_IMAGE reply %v", rep)
	}
	pl := make([]byte, rep.Size)
	if _, err := io.ReadFull(br, pl); err != nil {
		return nil, err
	}
	sel, err := protocol.ParseSelectImageReply(pl)
	if err != nil {
		return nil, err
	}
	if sel.RID == 0 || sel.Size == 0 {
		return nil, fmt.Errorf("bad SELECT_IMAGE reply: rid %d size %d", sel.RID, sel.Size)
	}
	return &session{nc: nc, br: br, reply: sel}, nil
}
