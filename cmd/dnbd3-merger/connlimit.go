package main

import (
	"io"
	"net"
	"sync"
	"time"
)

// Connection limit: every client connection is a descriptor, so their
// number is bounded (--max-connections, shared by all listeners). A
// connection beyond the bound is accepted and closed at once - after a
// plain-HTTP 503 with Retry-After on http listeners, so that clients back
// off instead of seeing a reset - rather than left in the kernel's
// backlog, where it would wait behind connections that may never end.

// busyReply is what a connection over the limit gets on plain http.
const busyReply = "HTTP/1.1 503 Service Unavailable\r\n" +
	"Retry-After: 5\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\n" +
	"Content-Length: 46\r\n" +
	"Connection: close\r\n\r\n" +
	"Busy, retry later: too many connections open\r\n"

// maxRefusing bounds the refused connections that linger (see refuse).
const maxRefusing = 16

// connSlots counts the connections open, shared by the listeners, and
// the refused ones still lingering.
type connSlots struct {
	open     chan struct{}
	refusing chan struct{}
}

func newConnSlots(n int) *connSlots {
	return &connSlots{open: make(chan struct{}, n), refusing: make(chan struct{}, maxRefusing)}
}

// limitedListener is a listener whose connections take a slot until they
// are closed.
type limitedListener struct {
	net.Listener
	slots *connSlots
	plain bool // http: send busyReply before closing an extra connection
}

// Accept returns the next connection that gets a slot; connections
// without one are refused on the spot.
func (l *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots.open <- struct{}{}:
			return &slotConn{Conn: c, release: sync.OnceFunc(func() { <-l.slots.open })}, nil
		default:
			l.refuse(c)
		}
	}
}

// refuse closes a connection over the limit. On http it first sends
// busyReply and, if few refused connections linger, half-closes and
// reads what the client sent for up to half a second: closing a socket
// with unread data makes the kernel reset the connection, and the client
// would see the reset instead of the reply.
func (l *limitedListener) refuse(c net.Conn) {
	if !l.plain {
		c.Close()
		return
	}
	c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte(busyReply)); err != nil {
		c.Close()
		return
	}
	select {
	case l.slots.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	go func() {
		defer func() { <-l.slots.refusing }()
		defer c.Close()
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		io.Copy(io.Discard, io.LimitReader(c, 256<<10))
	}()
}

// slotConn gives its slot back when closed.
type slotConn struct {
	net.Conn
	release func()
}

func (c *slotConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

// CloseWrite half-closes the connection if the underlying one can (a
// TCP connection): net/http uses it to let a client read a reply to a
// request whose body was not read, instead of resetting the connection.
func (c *slotConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
