package server

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// zeroPage provides the zero padding between the end of an image file and
// its 4 KiB-rounded virtual size.
var zeroPage [4096]byte

// sendFile writes a reply header followed by n bytes of the image file at
// off, padding with zeros past fileSize. On sockets the data goes from the
// page cache without a copy, through a pooled pipe with splice(2)
// (splice.go) or else with sendfile(2); the header goes with MSG_MORE so
// the two leave in one segment. File offsets are explicit, so many
// connections share one descriptor safely. Other writers get pread+write.
//
// Reading the file (sendfile, splice into the pipe) is an ordinary (not
// raw) system call: it may block on the disk; the runtime then hands this
// thread's P to others.
func (s *sock) sendFile(hdr []byte, f *os.File, fd int, fileSize, off, n int64) error {
	if s.raw == nil {
		return copyReply(s.c, hdr, f, fileSize, off, n)
	}
	fileEnd := min(off+n, fileSize)
	end := off + n
	var p *pipe
	if fileEnd > off && s.pipes != nil {
		if p = s.pipes.get(); p != nil {
			defer s.pipes.put(p)
		}
	}
	var opErr error
	err := s.raw.Write(func(fd2 uintptr) bool {
		sock := int(fd2)
		for len(hdr) > 0 {
			flags := uintptr(unix.MSG_NOSIGNAL)
			if n > 0 {
				flags |= unix.MSG_MORE
			}
			k, e := rawSend(sock, hdr, flags)
			if e == unix.EAGAIN {
				return false
			}
			if e != 0 {
				opErr = e
				return true
			}
			hdr = hdr[k:]
		}
		if p != nil {
			done, err := p.send(sock, fd, &off, fileEnd, fileEnd < end)
			if !done {
				return false
			}
			if err != nil {
				opErr = err
				return true
			}
		}
		for off < fileEnd {
			k, err := unix.Sendfile(sock, fd, &off, int(min(fileEnd-off, 1<<30)))
			if err == unix.EAGAIN {
				return false
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				opErr = err
				return true
			}
			if k == 0 {
				opErr = io.ErrUnexpectedEOF // file shrank under us
				return true
			}
		}
		for off < end {
			k, e := rawSend(sock, zeroPage[:min(end-off, int64(len(zeroPage)))], unix.MSG_NOSIGNAL)
			if e == unix.EAGAIN {
				return false
			}
			if e != 0 {
				opErr = e
				return true
			}
			off += int64(k)
		}
		return true
	})
	if err != nil {
		return err
	}
	return opErr
}

// rawSend is send(2) as a raw system call (the socket is non-blocking),
// retried on EINTR.
func rawSend(fd int, p []byte, flags uintptr) (int, syscall.Errno) {
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), flags, 0, 0)
		if e != unix.EINTR {
			return int(r), e
		}
	}
}

func copyReply(w io.Writer, hdr []byte, f *os.File, fileSize, off, n int64) error {
	if _, err := w.Write(hdr); err != nil {
		return err
	}
	if fileEnd := min(off+n, fileSize); fileEnd > off {
		if _, err := io.Copy(w, io.NewSectionReader(f, off, fileEnd-off)); err != nil {
			return err
		}
		n -= fileEnd - off
		off = fileEnd
	}
	for n > 0 {
		k, err := w.Write(zeroPage[:min(n, int64(len(zeroPage)))])
		if err != nil {
			return err
		}
		n -= int64(k)
	}
	return nil
}

// isClosedErr reports errors that just mean the peer went away.
func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, unix.EPIPE) ||
		errors.Is(err, unix.ECONNRESET) || errors.Is(err, os.ErrDeadlineExceeded)
}
