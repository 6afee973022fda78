package nbdbridge

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// ListenAddr opens a listener for ServeListener from "unix:PATH" or
// "tcp:HOST:PORT" (HOST may be empty, an IPv6 address in brackets, or a
// name). A unix socket file left behind by a dead process is removed
// first; one that another process still listens on is an error. "unix:@name"
// is a Linux abstract socket.
func ListenAddr(spec string) (net.Listener, error) {
	scheme, addr, ok := strings.Cut(spec, ":")
	if !ok || addr == "" {
		return nil, fmt.Errorf("nbdbridge: listen address %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch scheme {
	case "unix":
		if !strings.HasPrefix(addr, "@") {
			if err := removeStaleSocket(addr); err != nil {
				return nil, err
			}
		}
		ln, err := net.Listen("unix", addr)
		if err != nil {
			return nil, fmt.Errorf("nbdbridge: listen on unix socket: %w", err)
		}
		return ln, nil
	case "tcp":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("nbdbridge: listen on TCP: %w", err)
		}
		return ln, nil
	}
	return nil, fmt.Errorf("nbdbridge: listen address %q: unknown scheme %q (want unix:PATH or tcp:HOST:PORT)", spec, scheme)
}

// removeStaleSocket deletes path if it is a unix socket nobody listens on.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nbdbridge: checking socket path: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("nbdbridge: %s exists and is not a socket; remove it or choose another path", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("nbdbridge: %s: another process listens on this socket", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("nbdbridge: checking whether %s is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("nbdbridge: removing stale socket: %w", err)
	}
	return nil
}
