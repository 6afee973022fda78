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
	r := &fileReply{hdr: hdr, fd: fd, off: off, fileEnd: fileEnd, end: end, p: p}
	if err := s.raw.Write(r.step); err != nil {
		return err
	}
	return r.err
}

// fileReply is the progress of one sendFile on a socket: the header, then
// the file data (through the pipe p if there is one, else sendfile), then
// the zero padding.
type fileReply struct {
	hdr               []byte
	fd                int
	off, fileEnd, end int64 // next byte, end of the file data, end of the reply
	p                 *pipe
	err               error // why the reply failed
}

// step sends what the socket takes. It reports false if the socket is
// full (call again when it is writable), true when done or failed (err).
func (r *fileReply) step(fd uintptr) bool {
	sock := int(fd)
	flags := uintptr(unix.MSG_NOSIGNAL)
	if r.end > r.off {
		flags |= unix.MSG_MORE
	}
	k, done, err := sendMem(sock, r.hdr, flags)
	r.hdr = r.hdr[k:]
	if !done || err != nil {
		r.err = err
		return done
	}
	if r.p != nil {
		if done, err := r.p.send(sock, r.fd, &r.off, r.fileEnd, r.fileEnd < r.end); !done || err != nil {
			r.err = err
			return done
		}
	}
	if done, err := sendfileAll(sock, r.fd, &r.off, r.fileEnd); !done || err != nil {
		r.err = err
		return done
	}
	for r.off < r.end {
		k, done, err := sendMem(sock, zeroPage[:min(r.end-r.off, int64(len(zeroPage)))], unix.MSG_NOSIGNAL)
		r.off += int64(k)
		if !done || err != nil {
			r.err = err
			return done
		}
	}
	return true
}

// sendMem sends b to the non-blocking socket. It returns how many bytes
// went out, and false if the socket is full before the end, else true
// (all sent, or the send failed with err).
func sendMem(sock int, b []byte, flags uintptr) (int, bool, error) {
	sent := 0
	for sent < len(b) {
		k, e := rawSend(sock, b[sent:], flags)
		if e == unix.EAGAIN {
			return sent, false, nil
		}
		if e != 0 {
			return sent, true, e
		}
		sent += k
	}
	return sent, true, nil
}

// sendfileAll sends file bytes [*off, fileEnd) with sendfile(2); done and
// err as for sendMem.
func sendfileAll(sock, fd int, off *int64, fileEnd int64) (bool, error) {
	for *off < fileEnd {
		k, err := unix.Sendfile(sock, fd, off, int(min(fileEnd-*off, 1<<30)))
		switch {
		case err == unix.EAGAIN:
			return false, nil
		case err == unix.EINTR:
		case err != nil:
			return true, err
		case k == 0:
			return true, io.ErrUnexpectedEOF // file shrank under us
		}
	}
	return true, nil
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
