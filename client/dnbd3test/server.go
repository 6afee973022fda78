// Package dnbd3test provides an in-process DNBD3 server for tests, in the
// spirit of net/http/httptest. It serves images from memory on 127.0.0.1
// and can be told to misbehave: delay replies, reorder them, drop the
// connection, answer with CMD_ERROR, stall or send garbage.
//
// It is a test double, not a server: it implements just enough of the
// protocol (SELECT_IMAGE, GET_BLOCK, KEEPALIVE, GET_SERVERS, GET_CRC32) to
// exercise clients, including the reply-handle quirk of the reference (non
// GET_BLOCK replies carry the handle of the last GET_BLOCK).
package dnbd3test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Image is one image the server serves.
type Image struct {
	Name string // image name
	RID  uint16 // revision, >= 1
	// Data is the image content. The server reports the 4 KiB-rounded
	// virtual size and serves zeros past the end of Data.
	Data []byte
	// CRC, if true, makes GET_CRC32 answer with the image's CRC list;
	// otherwise the reply is empty (no list), like a server without a .crc.
	CRC bool
}

// Garbage selects a kind of malformed GET_BLOCK reply.
type Garbage int

// Kinds of malformed replies.
const (
	GarbageNone          Garbage = iota
	GarbageBadMagic              // a reply header with a wrong magic
	GarbageHugeSize              // a GET_BLOCK reply announcing 0xffffffff bytes
	GarbageUnknownHandle         // a GET_BLOCK reply for a handle never sent
	GarbageWrongSize             // a GET_BLOCK reply with a size other than requested
	GarbageUnknownCmd            // a reply with command 99 and a 2 MiB payload
)

// Behavior is how the server treats requests. Change it any time with
// Update; connections pick up the change at the next request.
type Behavior struct {
	// BlockDelay delays each GET_BLOCK reply by this long after its
	// request arrived (latency, not serialization: requests overlap).
	BlockDelay time.Duration
	// Reorder > 1 answers GET_BLOCKs in reversed batches of up to this
	// many requests (out-of-order replies as through a proxy).
	Reorder int
	// DropAfter > 0 closes a connection when it receives its
	// DropAfter+1-th GET_BLOCK (that request is not answered); -1 closes
	// it at the first GET_BLOCK.
	DropAfter int
	// ErrorAll answers every GET_BLOCK with CMD_ERROR (like a proxy whose
	// uplink failed) instead of data.
	ErrorAll bool
	// StallHandshake reads SELECT_IMAGE and never answers.
	StallHandshake bool
	// StallBlocks completes the handshake but never answers GET_BLOCK
	// (KEEPALIVE is not answered either).
	StallBlocks bool
	// Garbage makes GET_BLOCK replies malformed (after the handshake).
	Garbage Garbage
	// Servers is the GET_SERVERS reply.
	Servers []netip.AddrPort
	// SizeOverride, if non-zero, is reported as the image size.
	SizeOverride uint64
}

// Server is a fake DNBD3 server on 127.0.0.1.
type Server struct {
	addr   string
	images []Image

	mu       sync.Mutex
	behavior Behavior
	ln       net.Listener
	conns    map[net.Conn]struct{}
	closed   bool
	closing  chan struct{} // closed by Close: ends BlockDelay sleeps
	wg       sync.WaitGroup

	handshakes atomic.Int64
	blocks     atomic.Int64
	hopBlocks  atomic.Int64
	keepalives atomic.Int64
	getServers atomic.Int64
	accepted   atomic.Int64
}

// NewServer starts a server on 127.0.0.1 with a random port.
func NewServer(images ...Image) (*Server, error) {
	for i := range images {
		vs := protocol.VirtualSize(int64(len(images[i].Data)))
		if vs < protocol.BlockSize {
			vs = protocol.BlockSize
		}
		if int64(len(images[i].Data)) != vs {
			d := make([]byte, vs)
			copy(d, images[i].Data)
			images[i].Data = d
		}
		if images[i].RID == 0 {
			images[i].RID = 1
		}
	}
	s := &Server{images: images, conns: make(map[net.Conn]struct{}), closing: make(chan struct{})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.addr = ln.Addr().String()
	s.serve(ln)
	return s, nil
}

// Start starts a server and closes it when the test ends.
func Start(tb testing.TB, images ...Image) *Server {
	tb.Helper()
	s, err := NewServer(images...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Close)
	return s
}

// Addr returns the "127.0.0.1:port" address.
func (s *Server) Addr() string { return s.addr }

// AddrPort returns the address as a netip.AddrPort.
func (s *Server) AddrPort() netip.AddrPort { return netip.MustParseAddrPort(s.addr) }

// Update changes the behavior in place.
func (s *Server) Update(f func(b *Behavior)) {
	s.mu.Lock()
	f(&s.behavior)
	s.mu.Unlock()
}

func (s *Server) current() Behavior {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.behavior
}

// Handshakes returns the number of SELECT_IMAGE requests received.
func (s *Server) Handshakes() int64 { return s.handshakes.Load() }

// Blocks returns the number of GET_BLOCK requests received.
func (s *Server) Blocks() int64 { return s.blocks.Load() }

// HopBlocks returns the number of GET_BLOCK requests received with a
// non-zero hop count.
func (s *Server) HopBlocks() int64 { return s.hopBlocks.Load() }

// Keepalives returns the number of KEEPALIVE requests received.
func (s *Server) Keepalives() int64 { return s.keepalives.Load() }

// GetServers returns the number of GET_SERVERS requests received.
func (s *Server) GetServers() int64 { return s.getServers.Load() }

// Accepted returns the number of TCP connections accepted.
func (s *Server) Accepted() int64 { return s.accepted.Load() }

func (s *Server) serve(ln net.Listener) {
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			if s.closed || s.ln != ln {
				s.mu.Unlock()
				c.Close()
				continue
			}
			s.conns[c] = struct{}{}
			s.wg.Add(1)
			s.mu.Unlock()
			s.accepted.Add(1)
			go func() {
				defer s.wg.Done()
				s.handle(c)
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
		}
	}()
}

// KillConns closes every open connection but keeps listening.
func (s *Server) KillConns() {
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// Kill stops listening and closes every connection, as if the server
// process died. Restart brings it back on the same address.
func (s *Server) Kill() {
	s.mu.Lock()
	if s.ln != nil {
		s.ln.Close()
		s.ln = nil
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// Restart listens again on the same address after Kill.
func (s *Server) Restart() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("dnbd3test: server closed")
	}
	s.mu.Unlock()
	var ln net.Listener
	var err error
	for range 50 { // the port may linger briefly
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	s.serve(ln)
	return nil
}

// Close stops the server and waits for its goroutines.
func (s *Server) Close() {
	s.mu.Lock()
	if !s.closed {
		close(s.closing)
	}
	s.closed = true
	s.mu.Unlock()
	s.Kill()
	s.wg.Wait()
}

func (s *Server) find(name string, rid uint16) *Image {
	var best *Image
	for i := range s.images {
		im := &s.images[i]
		if im.Name != name {
			continue
		}
		if rid == 0 && (best == nil || im.RID > best.RID) || im.RID == rid {
			best = im
		}
	}
	return best
}

type job struct {
	cmd     protocol.Cmd
	handle  uint64
	off     uint64
	size    uint32
	arrived time.Time
	payload []byte
}

func (s *Server) handle(c net.Conn) {
	br := bufio.NewReaderSize(c, 64<<10)
	var hdr [protocol.RequestSize]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return
	}
	req, err := protocol.ParseRequest(hdr[:])
	if err != nil || req.Cmd != protocol.CmdSelectImage || req.Size > protocol.MaxPayload {
		return
	}
	payload := make([]byte, req.Size)
	if _, err := io.ReadFull(br, payload); err != nil {
		return
	}
	s.handshakes.Add(1)
	sel, err := protocol.ParseSelectImage(payload)
	if err != nil || sel.Version < protocol.MinClientVersion {
		return
	}
	b := s.current()
	img := s.find(sel.Name, sel.RID)
	if img == nil {
		return
	}
	if b.StallHandshake {
		io.Copy(io.Discard, br)
		return
	}
	rep := protocol.SelectImageReply{Version: protocol.Version, Name: img.Name, RID: img.RID, Size: uint64(len(img.Data))}
	if b.SizeOverride != 0 {
		rep.Size = b.SizeOverride
	}
	p := rep.Marshal()
	out := protocol.Reply{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
	if _, err := c.Write(append(out[:], p...)); err != nil {
		return
	}

	jobs := make(chan job, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.writer(c, img, jobs)
	}()
	defer func() {
		close(jobs)
		<-done
	}()
	var lastHandle uint64
	nblocks := 0
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return
		}
		req, err := protocol.ParseRequest(hdr[:])
		if err != nil {
			return
		}
		b := s.current()
		now := time.Now()
		switch req.Cmd {
		case protocol.CmdGetBlock:
			s.blocks.Add(1)
			if req.Hops != 0 {
				s.hopBlocks.Add(1)
			}
			nblocks++
			if b.DropAfter > 0 && nblocks > b.DropAfter || b.DropAfter < 0 {
				return
			}
			lastHandle = req.Handle
			if b.StallBlocks {
				continue
			}
			jobs <- job{cmd: protocol.CmdGetBlock, handle: req.Handle, off: req.Offset, size: req.Size, arrived: now}
		case protocol.CmdKeepalive:
			s.keepalives.Add(1)
			if b.StallBlocks {
				continue
			}
			jobs <- job{cmd: protocol.CmdKeepalive, handle: lastHandle}
		case protocol.CmdGetServers:
			s.getServers.Add(1)
			var list []protocol.ServerEntry
			for _, a := range b.Servers {
				list = append(list, protocol.ServerEntry{Addr: a})
			}
			jobs <- job{cmd: protocol.CmdGetServers, handle: lastHandle, payload: protocol.MarshalServerList(list)}
		case protocol.CmdGetCRC32:
			var pl []byte
			if img.CRC {
				l, err := protocol.ComputeCRCList(bytes.NewReader(img.Data), int64(len(img.Data)))
				if err == nil {
					pl = protocol.MarshalCRCList(l)
				}
			}
			jobs <- job{cmd: protocol.CmdGetCRC32, handle: lastHandle, payload: pl}
		}
		// Other commands are ignored; like the reference, their payload
		// is not drained.
	}
}

// writer sends the replies of one connection.
func (s *Server) writer(c net.Conn, img *Image, jobs <-chan job) {
	bw := bufio.NewWriterSize(c, 256<<10)
	var batch []job
	for j := range jobs {
		batch = append(batch[:0], j)
		if b := s.current(); b.Reorder > 1 && j.cmd == protocol.CmdGetBlock {
			timer := time.NewTimer(5 * time.Millisecond)
		collect:
			for len(batch) < b.Reorder {
				select {
				case j2, ok := <-jobs:
					if !ok {
						break collect
					}
					batch = append(batch, j2)
				case <-timer.C:
					break collect
				}
			}
			timer.Stop()
			for l, r := 0, len(batch)-1; l < r; l, r = l+1, r-1 {
				batch[l], batch[r] = batch[r], batch[l]
			}
		}
		for _, j := range batch {
			if err := s.reply(bw, img, j); err != nil {
				c.Close()
				for range jobs {
				}
				return
			}
		}
		if len(jobs) == 0 {
			if err := bw.Flush(); err != nil {
				c.Close()
				for range jobs {
				}
				return
			}
		}
	}
	bw.Flush()
}

func (s *Server) reply(w *bufio.Writer, img *Image, j job) error {
	b := s.current()
	if j.cmd != protocol.CmdGetBlock {
		h := protocol.Reply{Cmd: j.cmd, Size: uint32(len(j.payload)), Handle: j.handle}.Marshal()
		w.Write(h[:])
		_, err := w.Write(j.payload)
		return err
	}
	if b.BlockDelay > 0 {
		if d := time.Until(j.arrived.Add(b.BlockDelay)); d > 0 {
			if err := w.Flush(); err != nil {
				return err
			}
			select {
			case <-time.After(d):
			case <-s.closing:
				return net.ErrClosed
			}
		}
	}
	size := uint64(len(img.Data))
	if b.ErrorAll || j.off >= size || j.off+uint64(j.size) > size {
		h := protocol.Reply{Cmd: protocol.CmdError, Handle: j.handle}.Marshal()
		_, err := w.Write(h[:])
		return err
	}
	switch b.Garbage {
	case GarbageBadMagic:
		_, err := w.Write([]byte("HTTP/1.0 400 Bad Request\r\n\r\n"))
		return err
	case GarbageHugeSize:
		h := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: 0xffffffff, Handle: j.handle}.Marshal()
		_, err := w.Write(h[:])
		return err
	case GarbageUnknownHandle:
		h := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: j.size, Handle: j.handle ^ 0x5a5a5a5a00000000}.Marshal()
		w.Write(h[:])
		_, err := w.Write(img.Data[j.off : j.off+uint64(j.size)])
		return err
	case GarbageWrongSize:
		h := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: j.size + 1, Handle: j.handle}.Marshal()
		w.Write(h[:])
		w.Write(img.Data[j.off : j.off+uint64(j.size)])
		_, err := w.Write([]byte{0})
		return err
	case GarbageUnknownCmd:
		h := protocol.Reply{Cmd: 99, Size: 2 << 20, Handle: j.handle}.Marshal()
		w.Write(h[:])
		_, err := w.Write(make([]byte, 2<<20))
		return err
	}
	h := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: j.size, Handle: j.handle}.Marshal()
	w.Write(h[:])
	_, err := w.Write(img.Data[j.off : j.off+uint64(j.size)])
	return err
}

// String describes the server for test logs.
func (s *Server) String() string { return fmt.Sprintf("dnbd3test.Server(%s)", s.addr) }
