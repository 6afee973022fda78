package nbdbridge

// Sockets handed to the kernel on the kernel-direct path
// (docs/kernel-direct.md): TCP connections to a DNBD3 server switched to
// the NBD transmission protocol. The daemon keeps its own descriptor of
// each one — never reading from it — to see when it hangs up and to
// retire it (shutdown) when the device should move to another server.

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DirectDialer supplies connections for the kernel-direct path.
type DirectDialer interface {
	// DialDirect returns n connections to one server, already switched to
	// the NBD transmission protocol (nothing of them buffered), and the
	// server's address. An error means the relay path must serve.
	DialDirect(ctx context.Context, n int) ([]net.Conn, string, error)
	// Preferred is the server direct connections should go to now (the
	// one the client's RTT probing and failover chose), "" if unknown.
	Preferred() string
}

// Socket options of a direct socket. The kernel sends no keepalives of
// its own; TCP keepalive (idle) and TCP_USER_TIMEOUT (unacknowledged
// requests) make a vanished server's socket fail, so that the kernel marks
// it dead and the daemon replaces it.
const (
	directKeepIdle    = 5 // seconds
	directKeepIntvl   = 2
	directKeepCnt     = 3
	directUserTimeout = 15 * time.Second
	// sentinelSndTimeo is set as SO_SNDTIMEO before a socket is offered to
	// the kernel, which overwrites it with its request timeout (whole
	// seconds) when it adopts the socket (nbd_start_device,
	// nbd_reconnect_socket). A socket that still has it was dropped (a
	// RECONFIGURE with no dead slot left silently drops sockets).
	sentinelSndTimeo = 7 * time.Millisecond
)

// kernelSocket turns a connection returned by DialDirect into a blocking
// socket descriptor owned by the caller; c is closed (the socket lives on
// in the descriptor).
func kernelSocket(c net.Conn) (int, error) {
	defer c.Close()
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("nbdbridge: kernel-direct: %T has no descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := raw.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("kernel-direct: dup: %w", derr)
	}
	// The open file is shared with c's descriptor, which the runtime made
	// non-blocking; the kernel's own reads and writes want it blocking.
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("kernel-direct: %w", err)
	}
	opts := []struct{ level, opt, v int }{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1}, // requests are 28 bytes: never delay them
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, directKeepIdle},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, directKeepIntvl},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, directKeepCnt},
		{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(directUserTimeout / time.Millisecond)},
	}
	for _, o := range opts {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("kernel-direct: setsockopt %d/%d: %w", o.level, o.opt, err)
		}
	}
	return fd, nil
}

// markOffered sets the sentinel send timeout on a socket about to be
// offered to the kernel.
func markOffered(fd int) error {
	tv := unix.NsecToTimeval(int64(sentinelSndTimeo))
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
}

// adopted reports whether the kernel took the socket: it set its request
// timeout (at least a second) as the send timeout.
func adopted(fd int) bool {
	tv, err := unix.GetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO)
	return err == nil && tv.Sec >= 1
}

// hungUp reports whether a socket is shut down or failed (the kernel
// marks a dead socket with shutdown(SHUT_RDWR); a server's FIN, RST or a
// keepalive failure end it too). It never reads.
func hungUp(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
	for {
		n, err := unix.Poll(p, 0)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0 && p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
	}
}

// retire shuts a socket down: the kernel's receive worker sees the end of
// the stream and marks the slot dead (LINK_DEAD), ready for a
// replacement.
func retire(fd int) { unix.Shutdown(fd, unix.SHUT_RDWR) }

// readStat returns the reads completed and the milliseconds spent on
// them by device index (/sys/block/nbdX/stat, fields 1 and 4).
func (s Sysfs) readStat(index int) (reads, ms int64, err error) {
	v, err := s.readAttr(index, "stat")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(v)
	if len(f) < 4 {
		return 0, 0, fmt.Errorf("nbdbridge: stat of %s: %q", DevicePath(index), v)
	}
	reads, err1 := strconv.ParseInt(f[0], 10, 64)
	ms, err2 := strconv.ParseInt(f[3], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("nbdbridge: stat of %s: %q", DevicePath(index), v)
	}
	return reads, ms, nil
}

// deviceIdle reports whether device index has no request in flight
// (/sys/block/nbdX/inflight: reads and writes).
func (s Sysfs) deviceIdle(index int) bool {
	v, err := s.readAttr(index, "inflight")
	if err != nil {
		return false
	}
	f := strings.Fields(v)
	return len(f) == 2 && f[0] == "0" && f[1] == "0"
}
