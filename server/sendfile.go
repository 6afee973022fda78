package server

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// zeroPage provides the zero padding between the end of an image file and
// its 4 KiB-rounded virtual size.
var zeroPage [4096]byte

// sendReply writes a reply header followed by n bytes of the image file at
// off, padding with zeros past fileSize. On sockets the data goes with
// sendfile(2) from the page cache, the header with MSG_MORE so the two
// leave in one segment; the file offset is passed explicitly, so many
// connections share one descriptor safely. Other writers get pread+write.
func sendReply(c net.Conn, hdr []byte, f *os.File, fd int, fileSize, off, n int64) error {
	if sc, ok := c.(syscall.Conn); ok {
		raw, err := sc.SyscallConn()
		if err == nil {
			return sendfileReply(raw, hdr, fd, fileSize, off, n)
		}
	}
	return copyReply(c, hdr, f, fileSize, off, n)
}

func sendfileReply(raw syscall.RawConn, hdr []byte, fd int, fileSize, off, n int64) error {
	fileEnd := min(off+n, fileSize)
	end := off + n
	var opErr error
	err := raw.Write(func(s uintptr) bool {
		sock := int(s)
		for len(hdr) > 0 {
			flags := unix.MSG_NOSIGNAL
			if n > 0 {
				flags |= unix.MSG_MORE
			}
			k, err := unix.SendmsgN(sock, hdr, nil, nil, flags)
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
			hdr = hdr[k:]
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
			k, err := unix.SendmsgN(sock, zeroPage[:min(end-off, int64(len(zeroPage)))], nil, nil, unix.MSG_NOSIGNAL)
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
			off += int64(k)
		}
		return true
	})
	if err != nil {
		return err
	}
	return opErr
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
