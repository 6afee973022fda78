package iscsi

import "encoding/binary"

// Mode pages.
const (
	pageCaching  = 0x08
	pageControl  = 0x0a
	pageInfoExc  = 0x1c
	pageAll      = 0x3f
	subpageAll   = 0xff
	pcCurrent    = 0
	pcChangeable = 1
	pcDefault    = 2
	pcSaved      = 3
)

// Device-specific parameter of the mode parameter header.
const (
	writeProtect = 0x80 // WP: the medium is write-protected
	dpoFUA       = 0x10 // DPO and FUA are accepted
)

// modePage returns a mode page as the given page control sees it:
// nothing is changeable, the defaults are the current values.
func modePage(code uint8, pc uint8) []byte {
	var p []byte
	switch code {
	case pageCaching:
		p = make([]byte, 20) // WCE 0 (nothing to write), read cache on
	case pageControl:
		p = make([]byte, 12)
		if pc != pcChangeable {
			p[3] = 0x10             // queue algorithm modifier 1: unrestricted reordering
			p[8], p[9] = 0xff, 0xff // busy timeout: unlimited
		}
	case pageInfoExc:
		p = make([]byte, 12)
	default:
		return nil
	}
	p[0], p[1] = code, byte(len(p)-2)
	return p
}

// modeSense answers MODE SENSE(6) and (10): the write-protect bit set,
// a block descriptor unless DBD, and the caching, control and
// informational exceptions pages.
func (s *session) modeSense(c *scsiCmd) result {
	ten := c.cdb[0] == opModeSense10
	dbd := c.cdb[1]&0x08 != 0
	llbaa := ten && c.cdb[1]&0x10 != 0
	pc, page, sub := c.cdb[2]>>6, c.cdb[2]&0x3f, c.cdb[3]
	alloc := int(c.cdb[4])
	if ten {
		alloc = int(binary.BigEndian.Uint16(c.cdb[7:]))
	}
	if pc == pcSaved {
		return checkCondition(sense{key: senseIllegalRequest, ascq: ascSavingNotSupported})
	}
	var pages []byte
	switch {
	case page == pageAll && (sub == 0 || sub == subpageAll):
		for _, code := range []uint8{pageCaching, pageControl, pageInfoExc} {
			pages = append(pages, modePage(code, pc)...)
		}
	case sub != 0 && sub != subpageAll:
		return checkCondition(invalidField(3))
	default:
		pages = modePage(page, pc)
		if pages == nil {
			return checkCondition(invalidField(2))
		}
	}
	var desc []byte
	if !dbd {
		blocks := s.numBlocks()
		if llbaa {
			desc = make([]byte, 16)
			binary.BigEndian.PutUint64(desc, blocks)
			binary.BigEndian.PutUint32(desc[12:], blockSize)
		} else {
			desc = make([]byte, 8)
			binary.BigEndian.PutUint32(desc, uint32(min(blocks, 0xffffffff)))
			binary.BigEndian.PutUint32(desc[4:], blockSize) // a reserved byte, then the length
		}
	}
	var b []byte
	if ten {
		b = make([]byte, 8)
		b[3] = writeProtect | dpoFUA
		if len(desc) == 16 {
			b[4] = 0x01 // LONGLBA
		}
		binary.BigEndian.PutUint16(b[6:], uint16(len(desc)))
	} else {
		b = make([]byte, 4)
		b[2] = writeProtect | dpoFUA
		b[3] = byte(len(desc))
	}
	b = append(append(b, desc...), pages...)
	if ten {
		binary.BigEndian.PutUint16(b, uint16(len(b)-2))
	} else {
		b[0] = byte(len(b) - 1)
	}
	return dataIn(b, alloc)
}
