package server

import (
	"io"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sock does a client connection's socket I/O with raw system calls.
//
// The socket stays non-blocking and owned by Go's netpoller: a read or
// write that would block parks the goroutine until the socket is ready (and
// deadlines work as usual). But the calls themselves go through
// RawSyscall: on a non-blocking socket they never block, so the runtime's
// syscall bookkeeping is not needed, and neither is what it costs on a
// lightly loaded server: after every idle moment the first system call
// wakes the runtime's sysmon thread, one more thread switch per request.
//
// Connections that are not sockets (tests) use plain Read and Write.
type sock struct {
	c     net.Conn
	raw   syscall.RawConn // nil: not a socket
	pipes *pipePool       // for large replies (splice.go), may be nil

	// The current calls' arguments and results, for readFn and writeFn
	// (bound once, so that a call allocates nothing). A read and a write
	// may run at the same time (the request loop reads while a relay
	// goroutine answers); each has its own fields.
	rbuf   []byte
	rn     int
	rerrno syscall.Errno
	wbufs  [2][]byte
	werrno syscall.Errno

	readFn, writeFn func(fd uintptr) bool
}

// rawWriteMax is the largest write done as a raw system call. A raw call
// cannot be interrupted by the runtime: a long copy into the socket would
// hold up a garbage collection that waits for this goroutine (measured:
// the collector spinning in suspendG while a proxy relayed 1 MiB replies).
const rawWriteMax = 256 << 10

func newSock(c net.Conn, pipes *pipePool) *sock {
	s := &sock{c: c, pipes: pipes}
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			s.raw = raw
			s.readFn = s.doRead
			s.writeFn = s.doWrite
		}
	}
	return s
}

// Read reads from the socket (io.Reader).
func (s *sock) Read(p []byte) (int, error) {
	if s.raw == nil {
		return s.c.Read(p)
	}
	if len(p) == 0 {
		return 0, nil
	}
	s.rbuf = p
	err := s.raw.Read(s.readFn)
	s.rbuf = nil
	switch {
	case err != nil:
		return 0, err
	case s.rerrno != 0:
		return 0, s.rerrno
	case s.rn == 0:
		return 0, io.EOF
	}
	return s.rn, nil
}

// doRead is one read(2) attempt; false means "would block".
func (s *sock) doRead(fd uintptr) bool {
	p := s.rbuf
	for {
		r, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			s.rn, s.rerrno = int(r), 0
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rn, s.rerrno = 0, e
		return true
	}
}

// write writes all of a, then all of b (either may be empty), with as few
// system calls as the socket buffer allows.
func (s *sock) write(a, b []byte) error {
	if s.raw == nil {
		if _, err := s.c.Write(a); err != nil {
			return err
		}
		if len(b) > 0 {
			_, err := s.c.Write(b)
			return err
		}
		return nil
	}
	s.wbufs = [2][]byte{a, b}
	s.werrno = 0
	err := s.raw.Write(s.writeFn)
	s.wbufs = [2][]byte{}
	if err != nil {
		return err
	}
	if s.werrno != 0 {
		return s.werrno
	}
	return nil
}

// doWrite sends what is left of wbufs; false means "would block".
func (s *sock) doWrite(fd uintptr) bool {
	for len(s.wbufs[0])+len(s.wbufs[1]) > 0 {
		var iov [2]unix.Iovec
		n := 0
		for _, b := range s.wbufs {
			if len(b) > 0 {
				iov[n].Base = &b[0]
				iov[n].SetLen(len(b))
				n++
			}
		}
		msg := unix.Msghdr{Iov: &iov[0]}
		msg.SetIovlen(n)
		var r uintptr
		var e syscall.Errno
		if len(s.wbufs[0])+len(s.wbufs[1]) > rawWriteMax {
			r, _, e = unix.Syscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), unix.MSG_NOSIGNAL)
		} else {
			r, _, e = unix.RawSyscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), unix.MSG_NOSIGNAL)
		}
		switch e {
		case 0:
			s.consume(int(r))
			continue
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.werrno = e
		return true
	}
	return true
}

// consume drops the first k written bytes from wbufs.
func (s *sock) consume(k int) {
	for i := range s.wbufs {
		d := min(k, len(s.wbufs[i]))
		s.wbufs[i] = s.wbufs[i][d:]
		k -= d
	}
}
