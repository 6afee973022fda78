package nbdbridge

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultSocketMode is the permission of a unix socket file that
// ListenConfig.Listen creates unless told otherwise: only the owner (and
// root) may connect.
const DefaultSocketMode fs.FileMode = 0o600

// ListenConfig holds the options of Listen. The zero value is ready to use.
type ListenConfig struct {
	// SocketMode is the permission of the socket file of "unix:PATH"
	// (0 means DefaultSocketMode). It is set exactly, whatever the umask,
	// and the file is never more open than this, not even for an instant.
	SocketMode fs.FileMode
}

// ListenAddr is ListenConfig{}.Listen(spec): a unix socket file gets mode
// 0600.
func ListenAddr(spec string) (net.Listener, error) {
	var lc ListenConfig
	return lc.Listen(spec)
}

// Listen opens a listener for ServeListener from "unix:PATH" or
// "tcp:HOST:PORT" (HOST may be empty, an IPv6 address in brackets, or a
// name). A unix socket file left behind by a dead process is removed
// first; one that another process still listens on is an error. "unix:@name"
// is a Linux abstract socket.
func (lc *ListenConfig) Listen(spec string) (net.Listener, error) {
	scheme, addr, ok := strings.Cut(spec, ":")
	if !ok || addr == "" {
		return nil, fmt.Errorf("nbdbridge: listen address %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch scheme {
	case "unix":
		if strings.HasPrefix(addr, "@") {
			ln, err := net.Listen("unix", addr)
			if err != nil {
				return nil, fmt.Errorf("listen on abstract unix socket: %w", err)
			}
			return ln, nil
		}
		if err := removeStaleSocket(addr); err != nil {
			return nil, err
		}
		return listenUnixFile(addr, cmp.Or(lc.SocketMode, DefaultSocketMode))
	case "tcp":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen on TCP: %w", err)
		}
		return ln, nil
	}
	return nil, fmt.Errorf("nbdbridge: listen address %q: unknown scheme %q (want unix:PATH or tcp:HOST:PORT)", spec, scheme)
}

// ListenAddrUnguarded reports whether spec is an address that no file
// permission guards, so that anyone who can reach it may connect: TCP
// (NBD has no authentication here) and abstract unix sockets (any process
// in the network namespace). A unix socket file is guarded by its mode.
func ListenAddrUnguarded(spec string) bool {
	scheme, addr, _ := strings.Cut(spec, ":")
	return scheme != "unix" || strings.HasPrefix(addr, "@")
}

// listenUnixFile binds a unix socket file with exactly the permission mode.
// Linux creates the file with the socket inode's mode minus the umask, so
// the mode is set on the socket before bind (the file never exists with a
// wider one) and, when the umask took bits away, restored on the file
// afterwards.
func listenUnixFile(path string, mode fs.FileMode) (net.Listener, error) {
	mode &= fs.ModePerm
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = unix.Fchmod(int(fd), uint32(mode)) }); cerr != nil {
			return cerr
		}
		return err
	}}
	ln, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on unix socket: %w", err)
	}
	if err := chmodSocket(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("setting the mode of socket %s: %w", path, err)
	}
	return ln, nil
}

// chmodSocket sets the mode of the socket file at path if it differs. It
// changes the file through an O_PATH descriptor opened without following
// symlinks, so a file swapped in after bind is never changed in its stead
// unless it is a socket too.
func chmodSocket(path string, mode fs.FileMode) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("nbdbridge: %s is no longer a socket", path)
	}
	if fs.FileMode(st.Mode)&fs.ModePerm == mode {
		return nil
	}
	// fchmod does not work on O_PATH descriptors; the /proc link does.
	return unix.Chmod("/proc/self/fd/"+strconv.Itoa(fd), uint32(mode))
}

// removeStaleSocket deletes path if it is a unix socket nobody listens on.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking socket path: %w", err)
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
		return fmt.Errorf("checking whether %s is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}
