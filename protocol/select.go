package protocol

import (
	"errors"
	"path"
	"strings"
)

// SelectImage is the payload of a CMD_SELECT_IMAGE request, the first
// message on every connection.
type SelectImage struct {
	Version uint16 // the client's protocol version (reference clients send 3)
	Name    string // image name
	RID     uint16 // revision; 0 asks for the latest
	Flags   uint8  // FlagServer, FlagBgRep
}

// Marshal encodes the payload.
func (s SelectImage) Marshal() []byte {
	var w Writer
	w.PutU16(s.Version)
	w.PutString(s.Name)
	w.PutU16(s.RID)
	w.PutU8(s.Flags)
	return w.Bytes()
}

// Errors of the SELECT_IMAGE decoders.
var (
	ErrSelectTooShort = errors.New("protocol: select image payload shorter than 3 bytes")
	ErrSelectNoName   = errors.New("protocol: select image payload has no NUL-terminated name")
	ErrPayloadTooLong = errors.New("protocol: payload longer than 1000 bytes")
)

// ParseSelectImage decodes a SELECT_IMAGE request payload with the
// reference server's rules: fewer than 3 bytes or no NUL-terminated name is
// an error; missing trailing fields read as 0 and extra bytes are ignored.
// Checking the version and the name is left to the caller.
func ParseSelectImage(p []byte) (SelectImage, error) {
	if len(p) < 3 {
		return SelectImage{}, ErrSelectTooShort
	}
	if len(p) > MaxPayload {
		return SelectImage{}, ErrPayloadTooLong
	}
	r := NewReader(p)
	var s SelectImage
	s.Version = r.U16()
	name, ok := r.String()
	if !ok {
		return SelectImage{}, ErrSelectNoName
	}
	s.Name = name
	s.RID = r.U16()
	s.Flags = r.U8()
	return s, nil
}

// SelectImageReply is the payload of the server's SELECT_IMAGE reply.
type SelectImageReply struct {
	Version uint16 // 3, or the client's version if lower
	Name    string // canonical image name
	RID     uint16 // resolved revision
	Size    uint64 // virtual size, a multiple of BlockSize
	// Features is the dnbd3go extension (Feature* bits) appended after
	// Size, only for a client that sent FlagFeatures. 0 is not sent, and
	// a reply without it reads as 0: reference servers never send it.
	Features uint32
}

// Marshal encodes the payload.
func (s SelectImageReply) Marshal() []byte {
	var w Writer
	w.PutU16(s.Version)
	w.PutString(s.Name)
	w.PutU16(s.RID)
	w.PutU64(s.Size)
	if s.Features != 0 {
		w.PutU32(s.Features)
	}
	return w.Bytes()
}

// ParseSelectImageReply decodes a SELECT_IMAGE reply payload. Like the
// reference clients it requires 3..1000 bytes and a non-empty NUL-terminated
// name; missing integers read as 0 (callers check RID and Size).
func ParseSelectImageReply(p []byte) (SelectImageReply, error) {
	if len(p) < 3 {
		return SelectImageReply{}, ErrSelectTooShort
	}
	if len(p) > MaxPayload {
		return SelectImageReply{}, ErrPayloadTooLong
	}
	r := NewReader(p)
	var s SelectImageReply
	s.Version = r.U16()
	name, ok := r.String()
	if !ok || name == "" {
		return SelectImageReply{}, ErrSelectNoName
	}
	s.Name = name
	s.RID = r.U16()
	s.Size = r.U64()
	s.Features = r.U32()
	return s, nil
}

// MaxNameLength is the longest image name that fits a SELECT_IMAGE request
// (1000 - version - NUL - rid - flags).
const MaxNameLength = MaxPayload - 2 - 1 - 2 - 1

// ValidImageName reports whether a requested image name is acceptable to a
// server: not empty, at most MaxNameLength bytes, no NUL, not absolute, no
// component starting with '.' (which rules out "..", "./x" and hidden
// files), and canonical: path.Clean leaves it unchanged, so there is no
// "//" and no trailing '/'. Every file below the base path then has
// exactly one valid name; aliases such as "a//b" for "a/b" are refused
// instead of becoming images of their own.
func ValidImageName(name string) bool {
	switch {
	case name == "", len(name) > MaxNameLength:
		return false
	case name[0] == '/', name[0] == '.':
		return false
	case strings.Contains(name, "/."), strings.IndexByte(name, 0) >= 0:
		return false
	case path.Clean(name) != name:
		return false
	}
	return true
}

// MarshalLatestRID encodes the payload of a CMD_LATEST_RID reply: the rid
// as a little-endian u16. (The reference server never sends one; its kernel
// client knows how to read it.)
func MarshalLatestRID(rid uint16) []byte { return le.AppendUint16(nil, rid) }

// ErrLatestRIDLength is returned for a LATEST_RID payload that is not 2 bytes.
var ErrLatestRIDLength = errors.New("protocol: latest rid payload is not 2 bytes")

// ParseLatestRID decodes a CMD_LATEST_RID reply payload.
func ParseLatestRID(p []byte) (uint16, error) {
	if len(p) != 2 {
		return 0, ErrLatestRIDLength
	}
	return le.Uint16(p), nil
}
