package server

import (
	"io"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Large replies go from the page cache to the socket through a 1 MiB pipe
// with splice(2): zero-copy like sendfile, but a whole megabyte reaches
// the socket in one call. sendfile moves at most 64 KiB per internal step
// and pushes each step out on its own; on a fast link the client is then
// woken for every 64 KiB (on loopback twice as many wake-ups and receive
// calls per MiB as with the pipe). Pipes are pooled and capped server-wide;
// without one (cap reached, or no 1 MiB pipes for this user) replies use
// sendfile.
const (
	pipeSize = 1 << 20
	maxPipes = 16
)

// pipe is a pipe with n bytes of file data in it not yet sent.
type pipe struct {
	r, w int
	n    int
}

// pipePool lends pipes to replies in progress.
type pipePool struct {
	mu       sync.Mutex
	free     []*pipe
	open     int  // pipes open (free or lent)
	disabled bool // a pipe could not be made 1 MiB: use sendfile
}

// get returns an empty pipe, or nil.
func (pp *pipePool) get() *pipe {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		return p
	}
	if pp.disabled || pp.open >= maxPipes {
		return nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil
	}
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, pipeSize); err != nil {
		// Over pipe-max-size or the user's pipe-user-pages-soft limit.
		unix.Close(fds[0])
		unix.Close(fds[1])
		pp.disabled = true
		return nil
	}
	pp.open++
	return &pipe{r: fds[0], w: fds[1]}
}

// put takes a pipe back; one with data left in it (a reply that failed
// half-way) is closed.
func (pp *pipePool) put(p *pipe) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if p.n > 0 {
		unix.Close(p.r)
		unix.Close(p.w)
		pp.open--
		return
	}
	pp.free = append(pp.free, p)
}

// close closes the free pipes (at shutdown, when no reply is in progress).
func (pp *pipePool) close() {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	for _, p := range pp.free {
		unix.Close(p.r)
		unix.Close(p.w)
	}
	pp.open -= len(pp.free)
	pp.free = nil
}

// send moves file bytes [*off, fileEnd) through the pipe to the
// non-blocking socket sock; more means further bytes follow the file data
// (zero padding). It reports false if the socket is full (call again when
// it is writable); true when done or failed (err).
func (p *pipe) send(sock, file int, off *int64, fileEnd int64, more bool) (bool, error) {
	for *off < fileEnd || p.n > 0 {
		if p.n == 0 {
			// An ordinary system call: it may wait for the disk.
			k, err := unix.Splice(file, off, p.w, nil, int(min(fileEnd-*off, pipeSize)), 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return true, err
			}
			if k == 0 {
				return true, io.ErrUnexpectedEOF // the file shrank under us
			}
			p.n = int(k)
		}
		flags := uintptr(unix.SPLICE_F_NONBLOCK)
		if more || *off < fileEnd {
			flags |= unix.SPLICE_F_MORE
		}
		// Into the non-blocking socket; raw unless large (see rawWriteMax).
		var r uintptr
		var e syscall.Errno
		if p.n > rawWriteMax {
			r, _, e = unix.Syscall6(unix.SYS_SPLICE, uintptr(p.r), 0, uintptr(sock), 0, uintptr(p.n), flags)
		} else {
			r, _, e = unix.RawSyscall6(unix.SYS_SPLICE, uintptr(p.r), 0, uintptr(sock), 0, uintptr(p.n), flags)
		}
		switch e {
		case 0:
			p.n -= int(r)
		case unix.EINTR:
		case unix.EAGAIN:
			return false, nil
		default:
			return true, e
		}
	}
	return true, nil
}
