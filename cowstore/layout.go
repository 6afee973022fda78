package cowstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// Format constants of session version 3.
const (
	MetaMagic     uint64 = 0xEBE44D6E72F7825E
	DataMagic     uint64 = 0xEBE44D6E72F7825F
	Version              = 3
	BlockSize            = 4096
	BitfieldSize         = 40                        // bytes of bitfield per cluster
	ClusterBlocks        = BitfieldSize * 8          // 320 blocks
	ClusterSize          = ClusterBlocks * BlockSize // 1,310,720 bytes
	L2Entries            = 1024                      // entries per L2 table
	L2Span               = L2Entries * ClusterSize   // 1,342,177,280 bytes per table
	MaxImageSize         = 1_000_000_000_000         // 10^12
	L1Entries            = (MaxImageSize + L2Span - 1) / L2Span
	HeaderSize           = 320
	L2EntrySize          = 64
	L2TableSize          = L2Entries * L2EntrySize // 65536
	StartL1              = HeaderSize
	StartL2              = ((StartL1 + L1Entries*4 + L2TableSize - 1) / L2TableSize) * L2TableSize
	MetaSize             = StartL2 + L1Entries*L2TableSize
	FirstSlot            = ClusterSize // data slots start after one cluster (magic at 0)
	uuidField            = 40
	nameField            = 200
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
	b := make([]byte, HeaderSize)
	le.PutUint64(b[0:], MetaMagic)
	le.PutUint64(b[8:], h.imageSize)
	le.PutUint32(b[16:], Version)
	le.PutUint32(b[20:], 0) // blocksize is never written in v3
	le.PutUint64(b[24:], h.validRemoteSize)
	le.PutUint32(b[32:], StartL1)
	le.PutUint32(b[36:], StartL2)
	le.PutUint32(b[40:], BitfieldSize)
	le.PutUint32(b[44:], uint32(h.nextL2))
	le.PutUint64(b[48:], MetaSize)
	le.PutUint64(b[56:], uint64(h.nextClusterOffset))
	le.PutUint64(b[64:], MaxImageSize)
	le.PutUint64(b[72:], h.creationTime)
	copy(b[80:80+uuidField-1], h.uuid)
	copy(b[120:120+nameField-1], h.imageName)
	return b
}

// Errors of the header check.
var (
	errWrongEndian = errors.New("meta file has the wrong byte order (written on a big-endian machine?)")
	errNotMeta     = errors.New("not a dnbd3 COW meta file (bad magic)")
)

func parseHeader(b []byte) (header, error) {
	var h header
	if len(b) < HeaderSize {
		return h, fmt.Errorf("meta header: %d bytes, want %d", len(b), HeaderSize)
	}
	switch magic := le.Uint64(b); {
	case magic == MetaMagic:
	case magic == bits.ReverseBytes64(MetaMagic):
		return h, errWrongEndian
	default:
		return h, errNotMeta
	}
	h.imageSize = le.Uint64(b[8:])
	h.version = int32(le.Uint32(b[16:]))
	h.blocksize = int32(le.Uint32(b[20:]))
	h.validRemoteSize = le.Uint64(b[24:])
	h.startL1 = le.Uint32(b[32:])
	h.startL2 = le.Uint32(b[36:])
	h.bitfieldSize = int32(le.Uint32(b[40:]))
	h.nextL2 = int32(le.Uint32(b[44:]))
	h.metaSize = int64(le.Uint64(b[48:]))
	h.nextClusterOffset = int64(le.Uint64(b[56:]))
	h.maxImageSize = le.Uint64(b[64:])
	h.creationTime = le.Uint64(b[72:])
	h.uuid = cString(b[80 : 80+uuidField])
	h.imageName = cString(b[120 : 120+nameField])
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
	bits        [BitfieldSize]byte
	gen         uint64 // in memory only: changes with every modification
}

func (e *entry) marshalTo(b []byte) {
	le.PutUint64(b[0:], uint64(e.offset))
	le.PutUint64(b[8:], uint64(e.timeChanged))
	le.PutUint32(b[16:], e.uploads)
	le.PutUint32(b[20:], e.fails)
	copy(b[24:64], e.bits[:])
}

func parseEntry(b []byte) entry {
	var e entry
	e.offset = int64(le.Uint64(b[0:]))
	e.timeChanged = int64(le.Uint64(b[8:]))
	e.uploads = le.Uint32(b[16:])
	e.fails = le.Uint32(b[20:])
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
	return StartL2 + int64(table)*L2TableSize + int64(l2)*L2EntrySize
}
