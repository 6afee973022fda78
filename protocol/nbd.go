package protocol

import (
	"encoding/binary"
	"errors"
)

// The NBD transmission phase, as far as a DNBD3 connection switched with
// CmdNBDMode speaks it (the NBD project's doc/proto.md, "Transmission
// phase"; the Linux nbd driver's on-the-wire format): fixed-size
// big-endian request headers, simple replies, no handshake (the DNBD3
// handshake took its place).
//
// The switch: the client sends CmdNBDMode (size 0) on a connection whose
// SELECT_IMAGE reply announced FeatureNBD, with nothing else outstanding.
// The server answers a reply with cmd CmdNBDMode, size 0 and the request's
// handle; the next byte in either direction belongs to the NBD protocol.
// A server that cannot switch answers CmdError instead and the connection
// stays DNBD3.

// NBD transmission constants.
const (
	NBDRequestSize = 28 // magic, flags, type, cookie, offset, length
	NBDReplySize   = 16 // magic, error, cookie

	NBDRequestMagic uint32 = 0x25609513
	NBDReplyMagic   uint32 = 0x67446698

	NBDCmdRead        uint16 = 0
	NBDCmdWrite       uint16 = 1
	NBDCmdDisc        uint16 = 2
	NBDCmdFlush       uint16 = 3
	NBDCmdTrim        uint16 = 4
	NBDCmdWriteZeroes uint16 = 6

	// Error values of replies (errno numbers as proto.md defines them).
	NBDEPERM  uint32 = 1
	NBDEIO    uint32 = 5
	NBDEINVAL uint32 = 22

	// Transmission flags (NBD_ATTR_SERVER_FLAGS for the kernel).
	NBDFlagHasFlags     uint16 = 1 << 0
	NBDFlagReadOnly     uint16 = 1 << 1
	NBDFlagCanMultiConn uint16 = 1 << 8
)

// ErrNBDMagic means a request did not start with NBDRequestMagic; the
// stream cannot be resynchronised.
var ErrNBDMagic = errors.New("protocol: bad NBD request magic")

// NBDRequest is a transmission request header.
type NBDRequest struct {
	Flags  uint16 // command flags (FUA, NO_HOLE, ...)
	Type   uint16 // NBDCmd*
	Cookie uint64 // echoed in the reply ("handle")
	Offset uint64
	Length uint32
}

var be = binary.BigEndian

// ParseNBDRequest decodes the first NBDRequestSize bytes of b.
func ParseNBDRequest(b []byte) (NBDRequest, error) {
	if len(b) < NBDRequestSize {
		return NBDRequest{}, ErrShort
	}
	if be.Uint32(b) != NBDRequestMagic {
		return NBDRequest{}, ErrNBDMagic
	}
	return NBDRequest{
		Flags:  be.Uint16(b[4:]),
		Type:   be.Uint16(b[6:]),
		Cookie: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}, nil
}

// MarshalTo writes the request into b[:NBDRequestSize] (for clients and
// tests; the kernel writes its own).
func (r *NBDRequest) MarshalTo(b []byte) {
	_ = b[NBDRequestSize-1]
	be.PutUint32(b, NBDRequestMagic)
	be.PutUint16(b[4:], r.Flags)
	be.PutUint16(b[6:], r.Type)
	be.PutUint64(b[8:], r.Cookie)
	be.PutUint64(b[16:], r.Offset)
	be.PutUint32(b[24:], r.Length)
}

// PutNBDReply writes a simple reply header into b[:NBDReplySize]. A READ
// answered with errno 0 is followed by its data; an error reply carries
// none.
func PutNBDReply(b []byte, errno uint32, cookie uint64) {
	_ = b[NBDReplySize-1]
	be.PutUint32(b, NBDReplyMagic)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], cookie)
}

// ParseNBDReply decodes a simple reply header: its error and cookie.
func ParseNBDReply(b []byte) (errno uint32, cookie uint64, err error) {
	if len(b) < NBDReplySize {
		return 0, 0, ErrShort
	}
	if be.Uint32(b) != NBDReplyMagic {
		return 0, 0, errors.New("protocol: bad NBD reply magic")
	}
	return be.Uint32(b[4:]), be.Uint64(b[8:]), nil
}
