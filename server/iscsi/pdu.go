package iscsi

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Opcode is the operation code of a PDU (the low six bits of its first
// byte).
type Opcode uint8

// Opcodes of the PDUs an initiator sends.
const (
	OpNOPOut    Opcode = 0x00
	OpSCSICmd   Opcode = 0x01
	OpTMFReq    Opcode = 0x02
	OpLoginReq  Opcode = 0x03
	OpTextReq   Opcode = 0x04
	OpDataOut   Opcode = 0x05
	OpLogoutReq Opcode = 0x06
	OpSNACKReq  Opcode = 0x10
)

// Opcodes of the PDUs a target sends.
const (
	OpNOPIn      Opcode = 0x20
	OpSCSIResp   Opcode = 0x21
	OpTMFResp    Opcode = 0x22
	OpLoginResp  Opcode = 0x23
	OpTextResp   Opcode = 0x24
	OpDataIn     Opcode = 0x25
	OpLogoutResp Opcode = 0x26
	OpR2T        Opcode = 0x31
	OpAsync      Opcode = 0x32
	OpReject     Opcode = 0x3f
)

// BHSLen is the length of a basic header segment.
const BHSLen = 48

// maxAHSLen is the most additional header bytes a PDU can announce
// (TotalAHSLength is one byte counting 4-byte words).
const maxAHSLen = 255 * 4

// reserved is the "no task" tag value (ITT and TTT).
const reserved = 0xffffffff

// Flag bits of byte 1.
const (
	flagFinal    = 0x80
	flagRead     = 0x40 // SCSI command: data from the target
	flagWrite    = 0x20 // SCSI command: data to the target
	flagContinue = 0x40 // login and text: more text follows
	flagTransit  = 0x80 // login: go to the next stage
	flagStatus   = 0x01 // Data-In: carries the status
	flagOverflow = 0x04 // residual overflow (SCSI response, Data-In)
	flagUnder    = 0x02 // residual underflow
	immediateBit = 0x40 // byte 0
)

// BHS is a basic header segment. The accessors name the fields that are at
// the same place in every PDU; the others are read with U32 and U16 at
// their offsets from RFC 7143 section 11.
type BHS [BHSLen]byte

// Opcode returns the PDU's opcode.
func (h *BHS) Opcode() Opcode { return Opcode(h[0] & 0x3f) }

// Immediate reports the I bit (delivery outside the CmdSN order).
func (h *BHS) Immediate() bool { return h[0]&immediateBit != 0 }

// Flags returns byte 1 (the F bit and the opcode-specific flags).
func (h *BHS) Flags() uint8 { return h[1] }

// AHSLen returns the length of the additional header segments in bytes.
func (h *BHS) AHSLen() int { return int(h[4]) * 4 }

// DataLen returns the DataSegmentLength (without padding).
func (h *BHS) DataLen() int { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }

// SetDataLen sets the DataSegmentLength; n must be below 1<<24.
func (h *BHS) SetDataLen(n int) { h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n) }

// LUN returns bytes 8-15 (the logical unit number of commands).
func (h *BHS) LUN() uint64 { return binary.BigEndian.Uint64(h[8:]) }

// ITT returns the initiator task tag.
func (h *BHS) ITT() uint32 { return h.U32(16) }

// U32 returns the big-endian word at off.
func (h *BHS) U32(off int) uint32 { return binary.BigEndian.Uint32(h[off:]) }

// SetU32 sets the big-endian word at off.
func (h *BHS) SetU32(off int, v uint32) { binary.BigEndian.PutUint32(h[off:], v) }

// U16 returns the big-endian half word at off.
func (h *BHS) U16(off int) uint16 { return binary.BigEndian.Uint16(h[off:]) }

// SetU16 sets the big-endian half word at off.
func (h *BHS) SetU16(off int, v uint16) { binary.BigEndian.PutUint16(h[off:], v) }

// newBHS returns a header with the opcode and flags set.
func newBHS(op Opcode, flags uint8) BHS {
	var h BHS
	h[0] = byte(op)
	h[1] = flags
	return h
}

// PDU is a received protocol data unit.
type PDU struct {
	BHS
	AHS  []byte // additional header segments (nil if none)
	Data []byte // data segment without padding (nil if empty)
}

// Errors of the PDU reader. Each one ends the connection: with
// ErrorRecoveryLevel 0 there is no way to resynchronise the stream.
var (
	ErrDataTooLong  = errors.New("iscsi: data segment longer than MaxRecvDataSegmentLength")
	ErrHeaderDigest = errors.New("iscsi: header digest mismatch")
	ErrDataDigest   = errors.New("iscsi: data digest mismatch")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the digest of RFC 7143 (CRC32C, iSCSI byte order: the CRC's
// little-endian bytes on the wire).
func crc32c(parts ...[]byte) uint32 {
	var c uint32
	for _, p := range parts {
		c = crc32.Update(c, castagnoli, p)
	}
	return c
}

// pad4 returns how many bytes pad n to a multiple of 4.
func pad4(n int) int { return (4 - n&3) & 3 }

// pduReader reads PDUs from a connection. maxData bounds the data segment
// (our MaxRecvDataSegmentLength); the digests are switched on after the
// login negotiated them.
type pduReader struct {
	r            *bufio.Reader
	maxData      int
	headerDigest bool
	dataDigest   bool
}

// read returns the next PDU. Its Data slice is fresh for every PDU. An
// error in the middle of a PDU leaves the stream unusable.
func (pr *pduReader) read() (*PDU, error) {
	p := &PDU{}
	if _, err := io.ReadFull(pr.r, p.BHS[:]); err != nil {
		return nil, err
	}
	n := p.DataLen()
	if n > pr.maxData {
		return nil, fmt.Errorf("%w: %d > %d (opcode %#x)", ErrDataTooLong, n, pr.maxData, p.Opcode())
	}
	if n := p.AHSLen(); n > 0 {
		p.AHS = make([]byte, n) // at most 1020 bytes
		if _, err := io.ReadFull(pr.r, p.AHS); err != nil {
			return nil, unexpected(err)
		}
	}
	if pr.headerDigest {
		var d [4]byte
		if _, err := io.ReadFull(pr.r, d[:]); err != nil {
			return nil, unexpected(err)
		}
		if binary.LittleEndian.Uint32(d[:]) != crc32c(p.BHS[:], p.AHS) {
			return nil, ErrHeaderDigest
		}
	}
	if n == 0 {
		return p, nil
	}
	buf := make([]byte, n+pad4(n))
	if _, err := io.ReadFull(pr.r, buf); err != nil {
		return nil, unexpected(err)
	}
	p.Data = buf[:n]
	if pr.dataDigest {
		var d [4]byte
		if _, err := io.ReadFull(pr.r, d[:]); err != nil {
			return nil, unexpected(err)
		}
		if binary.LittleEndian.Uint32(d[:]) != crc32c(buf) {
			return nil, ErrDataDigest
		}
	}
	return p, nil
}

// unexpected turns an EOF inside a PDU into ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// header returns the bytes that go before a PDU's data segment: the BHS
// (no AHS: the target never sends one) and the header digest if on.
func header(h *BHS, headerDigest bool) []byte {
	if !headerDigest {
		return h[:]
	}
	b := make([]byte, BHSLen+4)
	copy(b, h[:])
	binary.LittleEndian.PutUint32(b[BHSLen:], crc32c(h[:]))
	return b
}

// appendPDU appends a whole PDU to b: header (with digest), data, padding
// and data digest.
func appendPDU(b []byte, h *BHS, data []byte, headerDigest, dataDigest bool) []byte {
	h.SetDataLen(len(data))
	b = append(b, header(h, headerDigest)...)
	if len(data) == 0 {
		return b
	}
	b = append(b, data...)
	var zero [4]byte
	pad := zero[:pad4(len(data))]
	b = append(b, pad...)
	if dataDigest {
		b = binary.LittleEndian.AppendUint32(b, crc32c(data, pad))
	}
	return b
}
