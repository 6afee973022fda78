package nbdbridge

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Limits of the option haggling, against clients that never finish it.
const (
	// maxOptionData is the largest option payload read (an export name may
	// take 4096 bytes, NBD_OPT_GO adds a few more).
	maxOptionData = 8 << 10
	// maxOptionDrain is the largest option payload skipped with
	// NBD_REP_ERR_INVALID; a longer one closes the connection.
	maxOptionDrain = 1 << 20
	// maxOptions is the number of options a client may send.
	maxOptions = 32
	// maxInfoBlockSize caps the maximum block size announced.
	maxInfoBlockSize = 32 << 20
)

// errHandshakeAborted is returned by negotiate after NBD_OPT_ABORT.
var errHandshakeAborted = errors.New("nbdbridge: client aborted the NBD handshake")

// exportConfig is what the handshake announces about the export.
type exportConfig struct {
	name        string
	description string
	size        func() int64
	flags       uint16
	minBlock    uint32
	prefBlock   uint32
	maxBlock    uint32
}

// matches reports whether a requested export name selects this export:
// its configured name, or "" (the default export, as QEMU's nbd:unix:PATH
// and nbd+unix:///?socket=PATH ask for).
func (x *exportConfig) matches(name string) bool {
	return name == "" || name == x.name
}

// negotiate runs the server side of the fixed newstyle handshake: it
// sends the greeting, then answers options until the client enters the
// transmission phase with NBD_OPT_GO or NBD_OPT_EXPORT_NAME (nil), aborts
// (errHandshakeAborted) or breaks the protocol (an error; the caller
// closes the connection). Reads go through br, which the transmission
// phase continues to use.
func negotiate(br *bufio.Reader, w io.Writer, x *exportConfig) error {
	out := make([]byte, 0, 512)
	out = binary.BigEndian.AppendUint64(out, protocol.NEGOTIATION_MAGIC_OLDSTYLE)
	out = binary.BigEndian.AppendUint64(out, protocol.NEGOTIATION_MAGIC_OPTION)
	out = binary.BigEndian.AppendUint16(out, wireHandshakeFlagFixedNewstyle|wireHandshakeFlagNoZeroes)
	if _, err := w.Write(out); err != nil {
		return fmt.Errorf("sending NBD greeting: %w", err)
	}
	var b [wireOptionHeaderSize]byte
	if _, err := io.ReadFull(br, b[:4]); err != nil {
		return fmt.Errorf("reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(b[:4])
	if clientFlags&^(wireClientFlagFixedNewstyle|wireClientFlagNoZeroes) != 0 {
		return fmt.Errorf("nbdbridge: unknown NBD client flags %#x", clientFlags)
	}
	noZeroes := clientFlags&wireClientFlagNoZeroes != 0

	for i := 0; ; i++ {
		if i == maxOptions {
			return fmt.Errorf("nbdbridge: more than %d NBD options", maxOptions)
		}
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return fmt.Errorf("reading NBD option: %w", err)
		}
		h := protocol.NegotiationOptionHeader{
			OptionMagic: binary.BigEndian.Uint64(b[0:]),
			ID:          binary.BigEndian.Uint32(b[8:]),
			Length:      binary.BigEndian.Uint32(b[12:]),
		}
		if h.OptionMagic != protocol.NEGOTIATION_MAGIC_OPTION {
			return fmt.Errorf("nbdbridge: bad NBD option magic %#x", h.OptionMagic)
		}
		if h.Length > maxOptionData {
			if h.ID == wireOptExportName || h.Length > maxOptionDrain {
				return fmt.Errorf("nbdbridge: NBD option %d with %d bytes of data", h.ID, h.Length)
			}
			if _, err := io.CopyN(io.Discard, br, int64(h.Length)); err != nil {
				return fmt.Errorf("reading NBD option data: %w", err)
			}
			if err := writeOptionReply(w, out[:0], h.ID, wireRepErrInvalid, []byte("option data too long")); err != nil {
				return err
			}
			continue
		}
		data := make([]byte, h.Length)
		if _, err := io.ReadFull(br, data); err != nil {
			return fmt.Errorf("reading NBD option data: %w", err)
		}
		done, err := x.option(w, out[:0], h.ID, data, noZeroes)
		if err != nil || done {
			return err
		}
	}
}

// option answers one option. done means the transmission phase begins.
func (x *exportConfig) option(w io.Writer, out []byte, opt uint32, data []byte, noZeroes bool) (done bool, err error) {
	switch opt {
	case wireOptExportName:
		if !x.matches(string(data)) {
			return false, fmt.Errorf("nbdbridge: client asked for unknown export %q", data)
		}
		out = binary.BigEndian.AppendUint64(out, uint64(max(x.size(), 0)))
		out = binary.BigEndian.AppendUint16(out, x.flags)
		if !noZeroes {
			out = append(out, make([]byte, wireExportNameZeroes)...)
		}
		if _, err := w.Write(out); err != nil {
			return false, fmt.Errorf("sending export info: %w", err)
		}
		return true, nil

	case wireOptAbort:
		// The client may already have closed the connection.
		_ = writeOptionReply(w, out, opt, wireRepAck, nil)
		return false, errHandshakeAborted

	case wireOptList:
		if len(data) != 0 {
			return false, writeOptionReply(w, out, opt, wireRepErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		}
		entry := binary.BigEndian.AppendUint32(nil, uint32(len(x.name)))
		entry = append(entry, x.name...)
		out = appendOptionReply(out, opt, wireRepServer, entry)
		out = appendOptionReply(out, opt, wireRepAck, nil)
		if _, err := w.Write(out); err != nil {
			return false, fmt.Errorf("sending export list: %w", err)
		}
		return false, nil

	case wireOptInfo, wireOptGo:
		name, ok := parseInfoRequest(data)
		if !ok {
			return false, writeOptionReply(w, out, opt, wireRepErrInvalid, []byte("malformed NBD_OPT_INFO/GO data"))
		}
		if !x.matches(name) {
			return false, writeOptionReply(w, out, opt, wireRepErrUnknown, []byte("unknown export: "+x.printable(name)))
		}
		out = x.appendInfo(out, opt)
		out = appendOptionReply(out, opt, wireRepAck, nil)
		if _, err := w.Write(out); err != nil {
			return false, fmt.Errorf("sending export info: %w", err)
		}
		return opt == wireOptGo, nil
	}
	// STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers and
	// anything unknown.
	return false, writeOptionReply(w, out, opt, wireRepErrUnsup, nil)
}

// appendInfo appends the NBD_REP_INFO replies of INFO/GO: export size and
// flags, name, description (if any) and block sizes, whatever the client
// asked for.
func (x *exportConfig) appendInfo(out []byte, opt uint32) []byte {
	var info []byte
	info = binary.BigEndian.AppendUint16(info[:0], wireInfoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(max(x.size(), 0)))
	info = binary.BigEndian.AppendUint16(info, x.flags)
	out = appendOptionReply(out, opt, wireRepInfo, info)

	info = binary.BigEndian.AppendUint16(info[:0], wireInfoName)
	info = append(info, x.name...)
	out = appendOptionReply(out, opt, wireRepInfo, info)

	if x.description != "" {
		info = binary.BigEndian.AppendUint16(info[:0], wireInfoDescription)
		info = append(info, x.description...)
		out = appendOptionReply(out, opt, wireRepInfo, info)
	}

	info = binary.BigEndian.AppendUint16(info[:0], wireInfoBlockSize)
	info = binary.BigEndian.AppendUint32(info, x.minBlock)
	info = binary.BigEndian.AppendUint32(info, x.prefBlock)
	info = binary.BigEndian.AppendUint32(info, x.maxBlock)
	return appendOptionReply(out, opt, wireRepInfo, info)
}

// printable shortens a client-supplied name for an error message.
func (x *exportConfig) printable(name string) string {
	if len(name) > 64 {
		name = name[:64] + "..."
	}
	return fmt.Sprintf("%q", name)
}

// parseInfoRequest decodes the data of NBD_OPT_INFO/GO: u32 name length,
// name, u16 number of information requests, u16 each. The requests are
// not needed: the server sends all it has.
func parseInfoRequest(data []byte) (name string, ok bool) {
	if len(data) < 4 {
		return "", false
	}
	n := binary.BigEndian.Uint32(data)
	rest := data[4:]
	if uint64(n)+2 > uint64(len(rest)) {
		return "", false
	}
	name, rest = string(rest[:n]), rest[n:]
	count := binary.BigEndian.Uint16(rest)
	if len(rest)-2 != 2*int(count) {
		return "", false
	}
	return name, true
}

// appendOptionReply appends one fixed-newstyle option reply.
func appendOptionReply(out []byte, opt, typ uint32, data []byte) []byte {
	out = binary.BigEndian.AppendUint64(out, protocol.NEGOTIATION_MAGIC_REPLY)
	out = binary.BigEndian.AppendUint32(out, opt)
	out = binary.BigEndian.AppendUint32(out, typ)
	out = binary.BigEndian.AppendUint32(out, uint32(len(data)))
	return append(out, data...)
}

// writeOptionReply sends one option reply.
func writeOptionReply(w io.Writer, out []byte, opt, typ uint32, data []byte) error {
	if _, err := w.Write(appendOptionReply(out, opt, typ, data)); err != nil {
		return fmt.Errorf("sending NBD option reply: %w", err)
	}
	return nil
}
