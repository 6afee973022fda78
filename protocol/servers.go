package protocol

import (
	"encoding/binary"
	"net/netip"
)

// Address types of a server entry.
const (
	HostNone uint8 = 0  // empty slot
	HostIP4  uint8 = 2  // AF_INET
	HostIP6  uint8 = 10 // AF_INET6
)

// ServerEntry is one 20-byte entry of a GET_SERVERS reply.
//
//	off size field
//	0   16   address, network byte order (IPv4 in the first 4 bytes)
//	16  2    port, big-endian
//	18  1    address type: 2 IPv4, 10 IPv6, 0 empty
//	19  1    failures (servers send 0; the kernel client reads non-zero as "remove")
type ServerEntry struct {
	Addr     netip.AddrPort
	Failures uint8
}

// MarshalTo writes the entry into b, which must hold ServerEntrySize bytes.
// An invalid address gives an empty (type 0) entry.
func (e ServerEntry) MarshalTo(b []byte) {
	_ = b[ServerEntrySize-1]
	clear(b[:ServerEntrySize])
	a := e.Addr.Addr()
	switch {
	case !a.IsValid():
		return
	case a.Is4() || a.Is4In6():
		v4 := a.Unmap().As4()
		copy(b, v4[:])
		b[18] = HostIP4
	default:
		v6 := a.As16()
		copy(b, v6[:])
		b[18] = HostIP6
	}
	binary.BigEndian.PutUint16(b[16:], e.Addr.Port())
	b[19] = e.Failures
}

// ParseServerEntry decodes one entry. ok is false for an empty slot, an
// unknown address type or a short buffer.
func ParseServerEntry(b []byte) (e ServerEntry, ok bool) {
	if len(b) < ServerEntrySize {
		return ServerEntry{}, false
	}
	port := binary.BigEndian.Uint16(b[16:])
	var a netip.Addr
	switch b[18] {
	case HostIP4:
		a = netip.AddrFrom4([4]byte(b[:4]))
	case HostIP6:
		a = netip.AddrFrom16([16]byte(b[:16]))
	default:
		return ServerEntry{}, false
	}
	return ServerEntry{Addr: netip.AddrPortFrom(a, port), Failures: b[19]}, true
}

// MarshalServerList encodes at most NumberServers entries as a GET_SERVERS
// reply payload.
func MarshalServerList(list []ServerEntry) []byte {
	if len(list) > NumberServers {
		list = list[:NumberServers]
	}
	b := make([]byte, len(list)*ServerEntrySize)
	for i, e := range list {
		e.MarshalTo(b[i*ServerEntrySize:])
	}
	return b
}

// ParseServerList decodes a GET_SERVERS reply payload, skipping empty or
// unknown entries and any trailing partial entry.
func ParseServerList(p []byte) []ServerEntry {
	var out []ServerEntry
	for len(p) >= ServerEntrySize {
		if e, ok := ParseServerEntry(p); ok {
			out = append(out, e)
		}
		p = p[ServerEntrySize:]
	}
	return out
}
