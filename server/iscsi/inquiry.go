package iscsi

import (
	"encoding/binary"
	"fmt"
	"strconv"
)

// Vendor is the INQUIRY vendor identification, the reference server's.
const Vendor = "UNI FRBG"

// Vital product data pages.
const (
	vpdSupported       = 0x00
	vpdSerial          = 0x80
	vpdDeviceID        = 0x83
	vpdBlockLimits     = 0xb0
	vpdBlockDevice     = 0xb1
	vpdProvisioning    = 0xb2
	peripheralNoLU     = 0x7f // qualifier 011b, type 1Fh: no logical unit here
	peripheralDiskType = 0x00
)

var vpdPages = []byte{vpdSupported, vpdSerial, vpdDeviceID, vpdBlockLimits, vpdBlockDevice, vpdProvisioning}

// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
var versionDescriptors = []uint16{0x00a0, 0x0960, 0x0460, 0x04c0}

// inquiry answers INQUIRY: standard data or a VPD page.
func (s *session) inquiry(c *scsiCmd) result {
	evpd, page := c.cdb[1]&0x01 != 0, c.cdb[2]
	alloc := int(binary.BigEndian.Uint16(c.cdb[3:]))
	if !evpd {
		if page != 0 {
			return checkCondition(invalidField(2))
		}
		return dataIn(s.standardInquiry(c.lun), alloc)
	}
	if c.lun != 0 {
		return checkCondition(senseLUN)
	}
	var body []byte
	switch page {
	case vpdSupported:
		body = vpdPages
	case vpdSerial:
		body = []byte(s.serial())
	case vpdDeviceID:
		body = s.deviceID()
	case vpdBlockLimits:
		body = blockLimits()
	case vpdBlockDevice:
		body = make([]byte, 60)
		body[1] = 1 // medium rotation rate: non-rotating
	case vpdProvisioning:
		body = make([]byte, 4) // no thin provisioning: nothing to report
	default:
		return checkCondition(invalidField(2))
	}
	b := make([]byte, 4, 4+len(body))
	b[0] = peripheralDiskType
	b[1] = page
	binary.BigEndian.PutUint16(b[2:], uint16(len(body)))
	return dataIn(append(b, body...), alloc)
}

// standardInquiry returns the standard INQUIRY data: a direct-access
// device (SPC-4, SBC-3), vendor UNI FRBG, the image name as product and
// the revision as product revision, as the reference server shows them.
func (s *session) standardInquiry(lun uint64) []byte {
	b := make([]byte, 74)
	b[0] = peripheralDiskType
	if lun != 0 {
		b[0] = peripheralNoLU
	}
	b[2] = 0x06        // SPC-4
	b[3] = 0x10 | 0x02 // HISUP, response data format 2
	b[4] = byte(len(b) - 5)
	b[7] = 0x02 // CMDQUE
	copy(b[8:16], Vendor)
	copy(b[16:32], asciiField(s.disk.Name(), 16))
	copy(b[32:36], revision(s.disk.RID()))
	for i, v := range versionDescriptors {
		binary.BigEndian.PutUint16(b[58+2*i:], v)
	}
	return b
}

// revision shows a rid in 4 characters: decimal up to 9999, else hex.
func revision(rid uint16) string {
	if rid <= 9999 {
		return fmt.Sprintf("%04d", rid)
	}
	return fmt.Sprintf("%04X", rid)
}

// asciiField returns s as an INQUIRY text field of n bytes: printable
// ASCII, padded with spaces.
func asciiField(s string, n int) []byte {
	b := printable(s)
	for len(b) < n {
		b = append(b, ' ')
	}
	return b[:n]
}

// printable returns s with every byte that is not printable ASCII
// replaced with '_'.
func printable(s string) []byte {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c >= 0x7f {
			b[i] = '_'
		}
	}
	return b
}

// serial is the unit serial number: the image name, as the reference
// server has it (at most 252 bytes, printable ASCII).
func (s *session) serial() string {
	b := printable(s.disk.Name())
	if len(b) > 252 {
		b = b[:252]
	}
	return string(b)
}

// deviceID returns the designators of VPD page 0x83: the NAA name from
// the image's WWN (the reference's: the same for every revision of the
// name, and what udev shows as wwn-0x...), and a T10 vendor ID with name
// and revision, which tells revisions apart.
func (s *session) deviceID() []byte {
	var b []byte
	// NAA, binary, logical unit
	b = append(b, 0x01, 0x03, 0x00, 0x08)
	b = binary.BigEndian.AppendUint64(b, s.disk.WWN())
	// T10 vendor ID, ASCII, logical unit
	id := append(asciiField(Vendor, 8), printable(s.disk.Name()+":"+strconv.Itoa(int(s.disk.RID())))...)
	if len(id) > 252 {
		id = id[:252]
	}
	id = append(id, make([]byte, pad4(len(id)))...)
	b = append(b, 0x02, 0x01, 0x00, byte(len(id)))
	return append(b, id...)
}

// blockLimits returns the body of VPD page 0xB0.
func blockLimits() []byte {
	b := make([]byte, 60)
	binary.BigEndian.PutUint16(b[2:], blocksPerPhys) // optimal transfer length granularity
	binary.BigEndian.PutUint32(b[4:], maxXferBlocks)
	binary.BigEndian.PutUint32(b[8:], optXferBlocks)
	binary.BigEndian.PutUint32(b[12:], maxXferBlocks) // maximum prefetch length
	return b
}
