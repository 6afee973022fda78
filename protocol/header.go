package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Errors returned by the header decoders.
var (
	// ErrBadMagic means the first two bytes are not 0x73 0x72.
	ErrBadMagic = errors.New("protocol: bad magic")
	// ErrShort means fewer bytes than a whole header were given.
	ErrShort = errors.New("protocol: short header")
)

var le = binary.LittleEndian

// Request is the 24-byte header a client sends.
//
//	off size field
//	0   2    magic 73 72
//	2   2    cmd    (u16 LE)
//	4   4    size   (u32 LE) GET_BLOCK: bytes wanted; otherwise payload length
//	8   7    offset (low 56 bits of a u64 LE)
//	15  1    hops   (hop count + flags, see HopCountMask)
//	16  8    handle (u64 LE, echoed by GET_BLOCK and ERROR replies)
type Request struct {
	Cmd    Cmd
	Size   uint32
	Offset uint64 // only the low 56 bits are sent
	Hops   uint8
	Handle uint64
}

// MarshalTo writes the header into b, which must hold RequestSize bytes.
func (r *Request) MarshalTo(b []byte) {
	_ = b[RequestSize-1]
	le.PutUint16(b[0:], Magic)
	le.PutUint16(b[2:], uint16(r.Cmd))
	le.PutUint32(b[4:], r.Size)
	le.PutUint64(b[8:], r.Offset&(MaxOffset-1))
	b[15] = r.Hops
	le.PutUint64(b[16:], r.Handle)
}

// Marshal returns the header as bytes.
func (r Request) Marshal() [RequestSize]byte {
	var b [RequestSize]byte
	r.MarshalTo(b[:])
	return b
}

// ParseRequest decodes a request header from the first RequestSize bytes of b.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < RequestSize {
		return Request{}, ErrShort
	}
	if le.Uint16(b) != Magic {
		return Request{}, ErrBadMagic
	}
	return Request{
		Cmd:    Cmd(le.Uint16(b[2:])),
		Size:   le.Uint32(b[4:]),
		Offset: le.Uint64(b[8:]) & (MaxOffset - 1),
		Hops:   b[15],
		Handle: le.Uint64(b[16:]),
	}, nil
}

// String formats the header for logs.
func (r Request) String() string {
	return fmt.Sprintf("%v size=%d offset=%d hops=%#02x handle=%#x", r.Cmd, r.Size, r.Offset, r.Hops, r.Handle)
}

// Reply is the 16-byte header a server sends.
//
//	off size field
//	0   2    magic 73 72
//	2   2    cmd    (u16 LE)
//	4   4    size   (u32 LE) payload bytes that follow
//	8   8    handle (u64 LE)
type Reply struct {
	Cmd    Cmd
	Size   uint32
	Handle uint64
}

// MarshalTo writes the header into b, which must hold ReplySize bytes.
func (r *Reply) MarshalTo(b []byte) {
	_ = b[ReplySize-1]
	le.PutUint16(b[0:], Magic)
	le.PutUint16(b[2:], uint16(r.Cmd))
	le.PutUint32(b[4:], r.Size)
	le.PutUint64(b[8:], r.Handle)
}

// Marshal returns the header as bytes.
func (r Reply) Marshal() [ReplySize]byte {
	var b [ReplySize]byte
	r.MarshalTo(b[:])
	return b
}

// ParseReply decodes a reply header from the first ReplySize bytes of b.
func ParseReply(b []byte) (Reply, error) {
	if len(b) < ReplySize {
		return Reply{}, ErrShort
	}
	if le.Uint16(b) != Magic {
		return Reply{}, ErrBadMagic
	}
	return Reply{
		Cmd:    Cmd(le.Uint16(b[2:])),
		Size:   le.Uint32(b[4:]),
		Handle: le.Uint64(b[8:]),
	}, nil
}

// String formats the header for logs.
func (r Reply) String() string {
	return fmt.Sprintf("%v size=%d handle=%#x", r.Cmd, r.Size, r.Handle)
}
