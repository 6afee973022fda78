package server

import (
	"net"
	"sync"
)

// handoffListener is a net.Listener fed with connections the protocol
// detector already read from: net/http serves them as if it had accepted
// them itself.
type handoffListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func newHandoffListener() *handoffListener {
	return &handoffListener{ch: make(chan net.Conn), done: make(chan struct{}), addr: &net.TCPAddr{}}
}

// Accept returns the next handed-off connection.
func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept.
func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

// Addr returns a placeholder address.
func (l *handoffListener) Addr() net.Addr { return l.addr }

// put hands a connection over; false if the listener is closed.
func (l *handoffListener) put(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

// prefixConn replays bytes that were read for protocol detection.
type prefixConn struct {
	net.Conn
	prefix  []byte
	onClose func()
	once    sync.Once
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

func (c *prefixConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.onClose)
	return err
}
