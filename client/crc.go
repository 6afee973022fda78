package client

import (
	"context"
	"fmt"
	"io"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// crcWaiter is an outstanding GET_CRC32. conn is the connection the
// request went out on, nil if it still has to be sent.
type crcWaiter struct {
	conn *conn
	ch   chan crcResult // cap 1
}

type crcResult struct {
	list []uint32
	err  error
}

// CRCList fetches the image's CRC-32 list (one CRC per 16 MiB hash block,
// protocol.HashBlockSize) with GET_CRC32 and verifies its master CRC. It
// returns nil, nil if the server has no list for the image. If the
// connection fails meanwhile, the request is repeated on the next one.
func (i *Image) CRCList(ctx context.Context) ([]uint32, error) {
	i.crcMu.Lock()
	defer i.crcMu.Unlock()
	w := &crcWaiter{ch: make(chan crcResult, 1)}
	i.mu.Lock()
	if i.closed {
		i.mu.Unlock()
		return nil, ErrClosed
	}
	i.crcWait = w
	if c := i.active; c != nil {
		i.sendCRCRequestLocked(c)
	}
	i.mu.Unlock()
	select {
	case res := <-w.ch:
		return res.list, res.err
	case <-ctx.Done():
		i.mu.Lock()
		if i.crcWait == w {
			i.crcWait = nil
		}
		i.mu.Unlock()
		return nil, fmt.Errorf("GET_CRC32: %w", context.Cause(ctx))
	}
}

// sendCRCRequestLocked sends the waiting GET_CRC32 on c.
func (i *Image) sendCRCRequestLocked(c *conn) {
	i.crcWait.conn = c
	c.sendq = append(c.sendq, protocol.Request{Cmd: protocol.CmdGetCRC32})
	c.signal()
}

// crcReply reads a GET_CRC32 reply and hands it to the waiter. The
// payload is bounded by the size the image's list can have.
func (c *conn) crcReply(rep protocol.Reply) error {
	i := c.img
	blocks := protocol.HashBlockCount(i.size)
	if int64(rep.Size) > 4*int64(blocks+1) {
		return fmt.Errorf("%w: %s sent a GET_CRC32 reply of %d bytes for %d hash blocks", ErrProtocol, c.srv.key, rep.Size, blocks)
	}
	p := make([]byte, rep.Size)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return c.readErr(err)
	}
	var res crcResult // an empty payload: the server has no CRC list
	if rep.Size > 0 {
		list, err := protocol.ParseCRCList(p)
		switch {
		case err != nil:
			res.err = fmt.Errorf("CRC list from %s: %w", c.srv.key, err)
		case len(list) != blocks:
			res.err = fmt.Errorf("client: CRC list from %s has %d entries, the image has %d hash blocks", c.srv.key, len(list), blocks)
		default:
			res.list = list
		}
	}
	i.mu.Lock()
	if w := i.crcWait; w != nil && w.conn == c {
		i.crcWait = nil
		w.ch <- res
	}
	i.mu.Unlock()
	return nil
}
