package nbdbridge

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// NBD wire constants that go-nbd's protocol package does not define. The
// names follow the NBD project's doc/proto.md; go-nbd's constants are used
// wherever they exist.
const (
	// Transmission phase.
	wireRequestSize = 28 // magic, flags, type, cookie, offset, length
	wireReplySize   = 16 // magic, error, cookie

	wireCmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	wireCmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	wireCmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	wireCmdFlush       = uint16(3)
	wireCmdTrim        = uint16(4)
	wireCmdWriteZeroes = uint16(6)

	wireCmdFlagFUA    = uint16(1 << 0)
	wireCmdFlagNoHole = uint16(1 << 1)

	// Transmission flags (16 bits, sent at the end of the handshake and
	// handed to the kernel as NBD_ATTR_SERVER_FLAGS).
	wireFlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	wireFlagReadOnly        = uint16(1 << 1)
	wireFlagSendFlush       = uint16(1 << 2)
	wireFlagSendFUA         = uint16(1 << 3)
	wireFlagRotational      = uint16(1 << 4)
	wireFlagSendTrim        = uint16(1 << 5)
	wireFlagSendWriteZeroes = uint16(1 << 6)
	wireFlagSendDF          = uint16(1 << 7)
	wireFlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN

	// Error values of simple replies (proto.md "Error values").
	wireEPERM     = protocol.TRANSMISSION_ERROR_EPERM
	wireEIO       = uint32(5)
	wireEINVAL    = protocol.TRANSMISSION_ERROR_EINVAL
	wireENOSPC    = uint32(28)
	wireESHUTDOWN = uint32(108)

	// Handshake phase.
	wireHandshakeFlagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	wireHandshakeFlagNoZeroes      = uint16(1 << 1)
	wireClientFlagFixedNewstyle    = uint32(1 << 0)
	wireClientFlagNoZeroes         = uint32(1 << 1)

	wireOptExportName     = uint32(1)
	wireOptAbort          = protocol.NEGOTIATION_ID_OPTION_ABORT
	wireOptList           = protocol.NEGOTIATION_ID_OPTION_LIST
	wireOptStartTLS       = uint32(5)
	wireOptInfo           = protocol.NEGOTIATION_ID_OPTION_INFO
	wireOptGo             = protocol.NEGOTIATION_ID_OPTION_GO
	wireOptStructuredRepl = uint32(8)

	wireRepAck        = protocol.NEGOTIATION_TYPE_REPLY_ACK
	wireRepServer     = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	wireRepInfo       = protocol.NEGOTIATION_TYPE_REPLY_INFO
	wireRepErrUnsup   = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	wireRepErrInvalid = uint32(3 | 1<<31)
	wireRepErrUnknown = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN

	wireInfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	wireInfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	wireInfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	wireInfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	wireOptionHeaderSize = 16 // IHAVEOPT, option, length
	wireExportNameZeroes = 124
)

// errBadRequestMagic is returned (wrapped) when a request does not start
// with NBD_REQUEST_MAGIC; the stream cannot be resynchronised.
var errBadRequestMagic = errors.New("nbdbridge: bad NBD request magic")

// parseRequest decodes a 28-byte transmission request header.
func parseRequest(b []byte) (protocol.TransmissionRequestHeader, error) {
	if len(b) < wireRequestSize {
		return protocol.TransmissionRequestHeader{}, fmt.Errorf("nbdbridge: short NBD request header (%d bytes)", len(b))
	}
	h := protocol.TransmissionRequestHeader{
		RequestMagic: binary.BigEndian.Uint32(b[0:]),
		CommandFlags: binary.BigEndian.Uint16(b[4:]),
		Type:         binary.BigEndian.Uint16(b[6:]),
		Handle:       binary.BigEndian.Uint64(b[8:]),
		Offset:       binary.BigEndian.Uint64(b[16:]),
		Length:       binary.BigEndian.Uint32(b[24:]),
	}
	if h.RequestMagic != protocol.TRANSMISSION_MAGIC_REQUEST {
		return h, fmt.Errorf("%w %#08x", errBadRequestMagic, h.RequestMagic)
	}
	return h, nil
}

// putRequest encodes a transmission request header into b[:28]. The engine
// only parses requests; this is its inverse for clients and tests.
func putRequest(b []byte, h protocol.TransmissionRequestHeader) {
	binary.BigEndian.PutUint32(b[0:], h.RequestMagic)
	binary.BigEndian.PutUint16(b[4:], h.CommandFlags)
	binary.BigEndian.PutUint16(b[6:], h.Type)
	binary.BigEndian.PutUint64(b[8:], h.Handle)
	binary.BigEndian.PutUint64(b[16:], h.Offset)
	binary.BigEndian.PutUint32(b[24:], h.Length)
}

// putReply encodes a simple reply header into b[:16].
func putReply(b []byte, errno uint32, cookie uint64) {
	binary.BigEndian.PutUint32(b[0:], protocol.TRANSMISSION_MAGIC_REPLY)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// parseReply decodes a simple reply header (for clients and tests).
func parseReply(b []byte) (protocol.TransmissionReplyHeader, error) {
	if len(b) < wireReplySize {
		return protocol.TransmissionReplyHeader{}, fmt.Errorf("nbdbridge: short NBD reply header (%d bytes)", len(b))
	}
	h := protocol.TransmissionReplyHeader{
		ReplyMagic: binary.BigEndian.Uint32(b[0:]),
		Error:      binary.BigEndian.Uint32(b[4:]),
		Handle:     binary.BigEndian.Uint64(b[8:]),
	}
	if h.ReplyMagic != protocol.TRANSMISSION_MAGIC_REPLY {
		return h, fmt.Errorf("nbdbridge: bad NBD reply magic %#08x", h.ReplyMagic)
	}
	return h, nil
}

// commandName names a request type for logs.
func commandName(t uint16) string {
	switch t {
	case wireCmdRead:
		return "READ"
	case wireCmdWrite:
		return "WRITE"
	case wireCmdDisc:
		return "DISC"
	case wireCmdFlush:
		return "FLUSH"
	case wireCmdTrim:
		return "TRIM"
	case wireCmdWriteZeroes:
		return "WRITE_ZEROES"
	}
	return fmt.Sprintf("CMD(%d)", t)
}

// flagNames lists the transmission flags in bit order.
var flagNames = [...]struct {
	bit  uint16
	name string
}{
	{wireFlagHasFlags, "HAS_FLAGS"},
	{wireFlagReadOnly, "READ_ONLY"},
	{wireFlagSendFlush, "SEND_FLUSH"},
	{wireFlagSendFUA, "SEND_FUA"},
	{wireFlagRotational, "ROTATIONAL"},
	{wireFlagSendTrim, "SEND_TRIM"},
	{wireFlagSendWriteZeroes, "SEND_WRITE_ZEROES"},
	{wireFlagSendDF, "SEND_DF"},
	{wireFlagCanMultiConn, "CAN_MULTI_CONN"},
}

// FormatFlags spells NBD transmission flags (as returned by Engine.Flags)
// the way proto.md names them, e.g. "HAS_FLAGS|READ_ONLY|CAN_MULTI_CONN".
// Unknown bits are shown in hex.
func FormatFlags(f uint16) string {
	var parts []string
	for _, n := range flagNames {
		if f&n.bit != 0 {
			parts = append(parts, n.name)
			f &^= n.bit
		}
	}
	if f != 0 {
		parts = append(parts, fmt.Sprintf("%#x", f))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// errnoFor maps a backend error to the NBD error value of the reply:
// read-only → EPERM, out of space or quota → ENOSPC, anything else
// (deadlines, network failures, short reads) → EIO.
func errnoFor(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM),
		errors.Is(err, syscall.EACCES):
		return wireEPERM
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return wireENOSPC
	}
	return wireEIO
}
