// Package sdnotifytest is a fake systemd notify socket for tests: it
// listens on a unixgram socket (the NOTIFY_SOCKET a test gives the code or
// process under test) and hands out the datagrams it receives.
package sdnotifytest

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Socket is a listening fake NOTIFY_SOCKET.
type Socket struct {
	// Path is the socket's file name, the value for NOTIFY_SOCKET.
	Path string
	conn *net.UnixConn
	msgs chan string
}

// Listen creates the socket in a temporary directory of t; it is closed
// when the test ends.
func Listen(t testing.TB) *Socket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("fake notify socket: %v", err)
	}
	s := &Socket{Path: path, conn: conn, msgs: make(chan string, 1024)}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(s.msgs)
				return
			}
			s.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { conn.Close() })
	return s
}

// Next returns the next datagram, or ok=false after timeout.
func (s *Socket) Next(timeout time.Duration) (msg string, ok bool) {
	select {
	case m, open := <-s.msgs:
		return m, open
	case <-time.After(timeout):
		return "", false
	}
}

// WaitFor returns the first datagram (skipping others) that has a line
// starting with prefix, such as "READY=1" or "STATUS=serving"; it fails
// the test after timeout, listing what it skipped.
func (s *Socket) WaitFor(t testing.TB, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var seen []string
	for {
		m, ok := s.Next(time.Until(deadline))
		if !ok {
			t.Fatalf("no notify message with %q within %v; got %q", prefix, timeout, seen)
		}
		if HasLine(m, prefix) {
			return m
		}
		seen = append(seen, m)
	}
}

// HasLine reports whether msg has a line starting with prefix.
func HasLine(msg, prefix string) bool {
	for _, l := range strings.Split(msg, "\n") {
		if strings.HasPrefix(l, prefix) {
			return true
		}
	}
	return false
}
