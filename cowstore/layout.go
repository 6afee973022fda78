package cowstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

var le = binary.LittleEndian

// header is the meta file's first 320 bytes.
type header struct {
	imageSize         uint64
	validRemoteSize   uint64
	nextL2            int32
	nextClusterOffset int64
	creationTime      uint64
	uuid              string
	imageName         string
	// read-only fields, checked on load
	version, blocksize, bitfieldSize int32
	startL1, startL2                 uint32
	metaSize                         int64
	maxImageSize                     uint64
}

func (h *header) marshal() []byte {
	b := make([]byte, cowformat.HeaderSize)
	le.PutUint64(b[cowformat.OffMagic:], cowformat.MetaMagic)
	le.PutUint64(b[cowformat.OffImageSize:], h.imageSize)
	le.PutUint32(b[cowformat.OffVersion:], cowformat.Version)
	le.PutUint32(b[cowformat.OffBlockSize:], 0) // blocksize is never written in v3
	le.PutUint64(b[cowformat.OffValidRemoteSize:], h.validRemoteSize)
	le.PutUint32(b[cowformat.OffStartL1:], cowformat.StartL1)
	le.PutUint32(b[cowformat.OffStartL2:], cowformat.StartL2)
	le.PutUint32(b[cowformat.OffBitfieldSize:], cowformat.BitfieldSize)
	le.PutUint32(b[cowformat.OffNextL2:], uint32(h.nextL2))
	le.PutUint64(b[cowformat.OffMetaSize:], cowformat.MetaSize)
	le.PutUint64(b[cowformat.OffNextClusterOffset:], uint64(h.nextClusterOffset))
	le.PutUint64(b[cowformat.OffMaxImageSize:], cowformat.MaxImageSize)
	le.PutUint64(b[cowformat.OffCreationTime:], h.creationTime)
	copy(b[cowformat.OffUUID:cowformat.OffUUID+cowformat.UUIDField-1], h.uuid)
	copy(b[cowformat.OffImageName:cowformat.OffImageName+cowformat.NameField-1], h.imageName)
	return b
}

// Errors of the header check.
var (
	errWrongEndian = errors.New("cowstore: meta file has the wrong byte order (written on a big-endian machine?)")
	errNotMeta     = errors.New("cowstore: not a dnbd3 COW meta file (bad magic)")
)

func parseHeader(b []byte) (header, error) {
	var h header
	if len(b) < cowformat.HeaderSize {
		return h, fmt.Errorf("cowstore: meta header: %d bytes, want %d", len(b), cowformat.HeaderSize)
	}
	switch magic := le.Uint64(b[cowformat.OffMagic:]); {
	case magic == cowformat.MetaMagic:
	case magic == bits.ReverseBytes64(cowformat.MetaMagic):
		return h, errWrongEndian
	default:
		return h, errNotMeta
	}
	h.imageSize = le.Uint64(b[cowformat.OffImageSize:])
	h.version = int32(le.Uint32(b[cowformat.OffVersion:]))
	h.blocksize = int32(le.Uint32(b[cowformat.OffBlockSize:]))
	h.validRemoteSize = le.Uint64(b[cowformat.OffValidRemoteSize:])
	h.startL1 = le.Uint32(b[cowformat.OffStartL1:])
	h.startL2 = le.Uint32(b[cowformat.OffStartL2:])
	h.bitfieldSize = int32(le.Uint32(b[cowformat.OffBitfieldSize:]))
	h.nextL2 = int32(le.Uint32(b[cowformat.OffNextL2:]))
	h.metaSize = int64(le.Uint64(b[cowformat.OffMetaSize:]))
	h.nextClusterOffset = int64(le.Uint64(b[cowformat.OffNextClusterOffset:]))
	h.maxImageSize = le.Uint64(b[cowformat.OffMaxImageSize:])
	h.creationTime = le.Uint64(b[cowformat.OffCreationTime:])
	h.uuid = cString(b[cowformat.OffUUID : cowformat.OffUUID+cowformat.UUIDField])
	h.imageName = cString(b[cowformat.OffImageName : cowformat.OffImageName+cowformat.NameField])
	return h, nil
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// entry is one L2 entry: a cluster's slot, upload bookkeeping and bitfield.
type entry struct {
	offset      int64
	timeChanged int64
	uploads     uint32
	fails       uint32
	bits        [cowformat.BitfieldSize]byte
	gen         uint64 // in memory only: changes with every modification
}

func (e *entry) marshalTo(b []byte) {
	le.PutUint64(b[cowformat.OffMagic:], uint64(e.offset))
	le.PutUint64(b[cowformat.OffImageSize:], uint64(e.timeChanged))
	le.PutUint32(b[cowformat.OffVersion:], e.uploads)
	le.PutUint32(b[cowformat.OffBlockSize:], e.fails)
	copy(b[24:64], e.bits[:])
}

func parseEntry(b []byte) entry {
	var e entry
	e.offset = int64(le.Uint64(b[cowformat.OffMagic:]))
	e.timeChanged = int64(le.Uint64(b[cowformat.OffImageSize:]))
	e.uploads = le.Uint32(b[cowformat.OffVersion:])
	e.fails = le.Uint32(b[cowformat.OffBlockSize:])
	copy(e.bits[:], b[24:64])
	return e
}

func (e *entry) has(block int) bool { return e.bits[block/8]&(1<<(block%8)) != 0 }
func (e *entry) set(block int)      { e.bits[block/8] |= 1 << (block % 8) }
func (e *entry) clear(block int)    { e.bits[block/8] &^= 1 << (block % 8) }

// popcount returns the number of set bits.
func (e *entry) popcount() int {
	n := 0
	for _, b := range e.bits {
		n += bits.OnesCount8(b)
	}
	return n
}

// metaOffset returns where the L2 entry l2 of table k lives in meta.
func metaOffset(table int32, l2 int) int64 {
	return cowformat.StartL2 + int64(table)*cowformat.L2TableSize + int64(l2)*cowformat.L2EntrySize
}
