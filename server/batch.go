package server

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Small GET_BLOCK replies are copied into a batch buffer instead of going
// out with a header send and a zero-copy send each: the request loop
// appends the replies of all requests that arrived together and sends them
// with one system call when no further request is buffered (or the batch
// is full). Up to 64 KiB the copy costs less than the zero-copy path's
// extra system calls and thread wake-ups per reply; from 128 KiB (the
// request size of the FUSE client and of block devices' read-ahead) the
// two copies cost the server more CPU than one splice through the pooled
// pipe (measured with the reference FUSE client: about 30 instead of 50 us
// of server CPU per 128 KiB request), so larger replies stay zero-copy
// (splice.go).
const (
	copyMax     = 64 << 10  // largest reply payload that is copied
	batchSize   = 256 << 10 // capacity of one batch buffer
	batchBudget = 64 << 20  // all batch buffers of the server together
)

// batchPool lends batch buffers to connections while they have replies
// queued; an idle connection holds none. Buffers beyond batchBudget are
// refused (the connection then uses sendfile), so the memory stays bounded
// however many clients read at once.
type batchPool struct {
	pool  sync.Pool
	inUse atomic.Int64
}

func (p *batchPool) get() *[]byte {
	if p.inUse.Add(batchSize) > batchBudget {
		p.inUse.Add(-batchSize)
		return nil
	}
	if b, ok := p.pool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, batchSize)
	return &b
}

func (p *batchPool) put(b *[]byte) {
	*b = (*b)[:0]
	p.pool.Put(b)
	p.inUse.Add(-batchSize)
}

// queueFromFile answers a GET_BLOCK from the image file like sendFromFile,
// but a small reply is only queued (appended to the batch buffer). The
// request loop calls flush before it waits for the next request. It is
// used only by the request loop.
func (cc *clientConn) queueFromFile(handle uint64, off int64, size uint32) error {
	if size > copyMax || size == 0 || cc.s.raw == nil {
		return cc.sendFromFile(handle, off, size)
	}
	cc.countSent(size)
	if !cc.lockWrite() {
		return net.ErrClosed
	}
	defer cc.wmu.Unlock()
	need := protocol.ReplySize + int(size)
	if cc.out != nil && len(*cc.out)+need > cap(*cc.out) {
		if err := cc.flushLocked(); err != nil {
			return err
		}
	}
	if cc.out == nil {
		if cc.out = cc.srv.batches.get(); cc.out == nil {
			return cc.sendFileLocked(handle, off, size)
		}
	}
	b := *cc.out
	n := len(b)
	b = b[:n+need]
	cc.putBlockHeader(b[n:], handle, size)
	if err := cc.img.readData(b[n+protocol.ReplySize:], off); err != nil {
		return err
	}
	*cc.out = b
	cc.queued = true
	return nil
}

// flush sends the queued replies.
func (cc *clientConn) flush() error {
	if !cc.queued {
		return nil
	}
	cc.queued = false
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	return cc.flushLocked()
}

// flushLocked sends the queued replies and returns the buffer. Every
// writer calls it (with wmu held) before its own reply, so replies leave
// in the order they were made.
func (cc *clientConn) flushLocked() error {
	if cc.out == nil {
		return nil
	}
	b := cc.out
	cc.out = nil
	var err error
	if !cc.dead {
		cc.refreshWriteDeadline(cc.timeout)
		err = cc.s.write(*b, nil)
	}
	cc.srv.batches.put(b)
	return err
}

// dropQueued discards unsent replies when the connection ends.
func (cc *clientConn) dropQueued() {
	cc.wmu.Lock()
	if cc.out != nil {
		cc.srv.batches.put(cc.out)
		cc.out = nil
	}
	cc.wmu.Unlock()
}

// readData fills p with the image's bytes at off (zeros past the end of
// the file, up to the virtual size). Data in the page cache is copied with
// a raw preadv2(RWF_NOWAIT), which cannot block; the rest is read with an
// ordinary pread, which may wait for the disk.
func (img *image) readData(p []byte, off int64) error {
	fileN := int(max(0, min(int64(len(p)), img.RealSize-off)))
	n := 0
	if fileN > 0 && !img.noNowait.Load() {
		iov := unix.Iovec{Base: &p[0]}
		iov.SetLen(fileN)
		r, _, e := unix.RawSyscall6(unix.SYS_PREADV2, uintptr(img.fd), uintptr(unsafe.Pointer(&iov)), 1, uintptr(off), 0, unix.RWF_NOWAIT)
		switch e {
		case 0:
			n = int(r)
		case unix.EOPNOTSUPP, unix.EINVAL, unix.ENOSYS:
			img.noNowait.Store(true) // this kernel or file system: no RWF_NOWAIT
		}
	}
	if n < fileN {
		k, err := img.file.ReadAt(p[n:fileN], off+int64(n))
		if k < fileN-n {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF // the file shrank under us
			}
			return err
		}
	}
	clear(p[fileN:])
	return nil
}
