package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// CRC32 is the standard (IEEE, zlib) CRC-32 used for hash blocks.
func CRC32(b []byte) uint32 { return crc32.ChecksumIEEE(b) }

// HashBlockCount returns the number of 16 MiB hash blocks of an image with
// the given virtual size.
func HashBlockCount(virtualSize int64) int {
	if virtualSize <= 0 {
		return 0
	}
	return int((virtualSize + HashBlockSize - 1) / HashBlockSize)
}

// MasterCRC returns the CRC-32 of the list entries as little-endian bytes.
func MasterCRC(list []uint32) uint32 {
	b := make([]byte, 4*len(list))
	for i, c := range list {
		binary.LittleEndian.PutUint32(b[4*i:], c)
	}
	return CRC32(b)
}

// MarshalCRCList encodes a CRC list as the GET_CRC32 payload and the `.crc`
// file use it: the master CRC, then one u32 per hash block, little-endian.
func MarshalCRCList(list []uint32) []byte {
	b := make([]byte, 4*(len(list)+1))
	binary.LittleEndian.PutUint32(b, MasterCRC(list))
	for i, c := range list {
		binary.LittleEndian.PutUint32(b[4*(i+1):], c)
	}
	return b
}

// Errors of ParseCRCList.
var (
	ErrCRCLength = errors.New("protocol: CRC list length is not 4*(n+1) with n >= 1")
	ErrCRCMaster = errors.New("protocol: CRC list master CRC mismatch")
)

// ParseCRCList decodes a `.crc` file or GET_CRC32 payload and verifies its
// master CRC. It returns the per-block CRCs.
func ParseCRCList(p []byte) ([]uint32, error) {
	if len(p) < 8 || len(p)%4 != 0 {
		return nil, ErrCRCLength
	}
	master := binary.LittleEndian.Uint32(p)
	list := make([]uint32, len(p)/4-1)
	for i := range list {
		list[i] = binary.LittleEndian.Uint32(p[4*(i+1):])
	}
	if MasterCRC(list) != master {
		return nil, ErrCRCMaster
	}
	return list, nil
}

// BlockCRC computes the CRC-32 of hash block i of an image whose file holds
// fileSize bytes. The block covers the image up to its 4 KiB-rounded virtual
// size; bytes past fileSize count as zeros. buf is scratch space (any size >
// 0; nil allocates).
func BlockCRC(r io.ReaderAt, fileSize int64, i int, buf []byte) (uint32, error) {
	if len(buf) == 0 {
		buf = make([]byte, 1<<20)
	}
	vsize := VirtualSize(fileSize)
	start := int64(i) * HashBlockSize
	end := min(start+HashBlockSize, vsize)
	if start < 0 || start >= vsize {
		return 0, fmt.Errorf("protocol: hash block %d out of range", i)
	}
	h := crc32.NewIEEE()
	for off := start; off < end; {
		n := min(int64(len(buf)), end-off)
		chunk := buf[:n]
		real := max(0, min(n, fileSize-off))
		if real > 0 {
			if k, err := r.ReadAt(chunk[:real], off); int64(k) < real {
				return 0, fmt.Errorf("read hash block %d at %d: %w", i, off, err)
			}
		}
		clear(chunk[real:])
		h.Write(chunk)
		off += n
	}
	return h.Sum32(), nil
}

// ComputeCRCList computes the CRC of every hash block of an image file of
// fileSize bytes.
func ComputeCRCList(r io.ReaderAt, fileSize int64) ([]uint32, error) {
	n := HashBlockCount(VirtualSize(fileSize))
	list := make([]uint32, n)
	buf := make([]byte, 1<<20)
	for i := range list {
		c, err := BlockCRC(r, fileSize, i, buf)
		if err != nil {
			return nil, err
		}
		list[i] = c
	}
	return list, nil
}
