package main

import (
	"bufio"
	"context"
	"net"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
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
	reply, br, err := client.SelectImage(nc, image, rid, 0, bufSize)
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return &session{nc: nc, br: br, reply: reply}, nil
}
