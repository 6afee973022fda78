package iscsi

// SCSI status codes.
const (
	statusGood           = 0x00
	statusCheckCondition = 0x02
	statusConditionMet   = 0x04
)

// Sense keys.
const (
	senseNoSense        = 0x00
	senseMediumError    = 0x03
	senseIllegalRequest = 0x05
	senseDataProtect    = 0x07
	senseMiscompare     = 0x0e
)

// sense is a sense key with its additional sense code and qualifier
// (ASC in the high byte).
type sense struct {
	key  uint8
	ascq uint16
	// info, if infoValid, goes into the INFORMATION field (the offset of
	// the first miscompare for VERIFY).
	info      uint64
	infoValid bool
	// field, if fieldValid, points at the invalid CDB byte (sense key
	// specific field pointer).
	field      uint16
	fieldValid bool
}

// Additional sense codes and qualifiers.
const (
	ascUnrecoveredRead    = 0x1100
	ascMiscompare         = 0x1d00
	ascInvalidOpcode      = 0x2000
	ascLBAOutOfRange      = 0x2100
	ascInvalidFieldInCDB  = 0x2400
	ascLUNNotSupported    = 0x2500
	ascWriteProtected     = 0x2700
	ascSavingNotSupported = 0x3900
)

var (
	senseInvalidOpcode = sense{key: senseIllegalRequest, ascq: ascInvalidOpcode}
	senseLBARange      = sense{key: senseIllegalRequest, ascq: ascLBAOutOfRange}
	senseLUN           = sense{key: senseIllegalRequest, ascq: ascLUNNotSupported}
	senseWriteProtect  = sense{key: senseDataProtect, ascq: ascWriteProtected}
	senseMedium        = sense{key: senseMediumError, ascq: ascUnrecoveredRead}
)

// invalidField is ILLEGAL REQUEST, INVALID FIELD IN CDB pointing at byte.
func invalidField(byteIndex int) sense {
	return sense{key: senseIllegalRequest, ascq: ascInvalidFieldInCDB, field: uint16(byteIndex), fieldValid: true}
}

// fixed returns the sense in fixed format (response code 0x70), the
// format our control mode page announces (D_SENSE 0).
func (s sense) fixed() []byte {
	b := make([]byte, 18)
	b[0] = 0x70
	b[2] = s.key
	if s.infoValid {
		b[0] |= 0x80
		v := s.info
		if v > 0xffffffff {
			v = 0xffffffff
		}
		b[3], b[4], b[5], b[6] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	}
	b[7] = 10 // additional sense length
	b[12], b[13] = byte(s.ascq>>8), byte(s.ascq)
	if s.fieldValid {
		b[15] = 0x80 | 0x40 // SKSV, C/D: the error is in the CDB
		b[16], b[17] = byte(s.field>>8), byte(s.field)
	}
	return b
}
