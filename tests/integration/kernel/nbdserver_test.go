package kernel

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// A minimal NBD transmission-phase server over one connection, backed by
// memory: enough to drive the kernel's client in these tests (the real
// engine lives in nbdbridge).

const (
	nbdRequestMagic = 0x25609513
	nbdReplyMagic   = 0x67446698

	nbdCmdRead        = 0
	nbdCmdWrite       = 1
	nbdCmdDisc        = 2
	nbdCmdFlush       = 3
	nbdCmdTrim        = 4
	nbdCmdWriteZeroes = 6

	nbdFlagHasFlags     = 1 << 0
	nbdFlagSendFlush    = 1 << 2
	nbdFlagSendFUA      = 1 << 3
	nbdFlagSendTrim     = 1 << 5
	nbdFlagCanMultiConn = 1 << 8

	errnoEINVAL = 22
)

// errDisc is returned by serve when the kernel sent NBD_CMD_DISC.
var errDisc = errors.New("NBD_CMD_DISC received")

type memServer struct {
	mu   sync.Mutex
	data []byte
	// hold, if set, is asked about every READ; true leaves it unanswered
	// and reports its offset on held.
	hold func(off uint64, length uint32) bool
	held chan uint64
	// count of requests by command
	counts map[uint16]int
}

func newMemServer(size int) *memServer {
	return &memServer{data: make([]byte, size), held: make(chan uint64, 16), counts: map[uint16]int{}}
}

func (s *memServer) size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return int64(len(s.data))
}

func (s *memServer) count(cmd uint16) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[cmd]
}

// snapshot copies n bytes at off of the backing memory.
func (s *memServer) snapshot(off, n int) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.data[off:off+n]...)
}

func (s *memServer) fill(off int, p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	copy(s.data[off:], p)
}

// serve answers requests on c until NBD_CMD_DISC (errDisc) or an error.
func (s *memServer) serve(c net.Conn) error {
	r := bufio.NewReaderSize(c, 256<<10)
	var hdr [28]byte
	reply := make([]byte, 16, 16+(1<<20))
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint32(hdr[0:]); m != nbdRequestMagic {
			return fmt.Errorf("bad request magic %#x", m)
		}
		cmd := binary.BigEndian.Uint16(hdr[6:])
		off := binary.BigEndian.Uint64(hdr[16:])
		n := binary.BigEndian.Uint32(hdr[24:])
		var payload []byte
		if cmd == nbdCmdWrite {
			payload = make([]byte, n)
			if _, err := io.ReadFull(r, payload); err != nil {
				return err
			}
		}
		s.mu.Lock()
		s.counts[cmd]++
		inRange := off+uint64(n) <= uint64(len(s.data))
		hold := s.hold
		s.mu.Unlock()
		if cmd == nbdCmdDisc {
			return errDisc
		}
		if cmd == nbdCmdRead && hold != nil && hold(off, n) {
			s.held <- off
			continue
		}
		var errno uint32
		reply = reply[:16]
		s.mu.Lock()
		switch {
		case !inRange && cmd != nbdCmdFlush:
			errno = errnoEINVAL
		case cmd == nbdCmdRead:
			reply = append(reply, s.data[off:off+uint64(n)]...)
		case cmd == nbdCmdWrite:
			copy(s.data[off:], payload)
		case cmd == nbdCmdWriteZeroes, cmd == nbdCmdTrim:
			clear(s.data[off : off+uint64(n)])
		case cmd == nbdCmdFlush:
		default:
			errno = errnoEINVAL
		}
		s.mu.Unlock()
		binary.BigEndian.PutUint32(reply[0:], nbdReplyMagic)
		binary.BigEndian.PutUint32(reply[4:], errno)
		copy(reply[8:16], hdr[8:16])
		if _, err := c.Write(reply); err != nil {
			return err
		}
	}
}
