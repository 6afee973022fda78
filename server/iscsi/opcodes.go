package iscsi

import "encoding/binary"

// command describes one SCSI command the target knows: its CDB usage data
// (REPORT SUPPORTED OPERATION CODES; also the bits checked for reserved
// fields: a bit set in a CDB but not in usage is INVALID FIELD IN CDB) and
// its handler. Write-type commands have no handler: they all end in DATA
// PROTECT / WRITE PROTECTED.
type command struct {
	op    uint8
	sa    uint8 // service action, if hasSA
	hasSA bool
	usage []byte // CDB usage data; len is the CDB length
	run   func(s *session, c *scsiCmd) result
	write bool // a medium write: refused
	anyLU bool // also answered for a LUN that does not exist
}

// Operation codes.
const (
	opTestUnitReady   = 0x00
	opRequestSense    = 0x03
	opFormatUnit      = 0x04
	opReassignBlocks  = 0x07
	opRead6           = 0x08
	opWrite6          = 0x0a
	opInquiry         = 0x12
	opModeSense6      = 0x1a
	opStartStopUnit   = 0x1b
	opPreventAllow    = 0x1e
	opReadCapacity10  = 0x25
	opRead10          = 0x28
	opWrite10         = 0x2a
	opWriteVerify10   = 0x2e
	opVerify10        = 0x2f
	opPrefetch10      = 0x34
	opSyncCache10     = 0x35
	opWriteLong10     = 0x3f
	opWriteSame10     = 0x41
	opUnmap           = 0x42
	opSanitize        = 0x48
	opModeSense10     = 0x5a
	opRead16          = 0x88
	opCompareAndWrite = 0x89
	opWrite16         = 0x8a
	opOrWrite         = 0x8b
	opWriteVerify16   = 0x8e
	opVerify16        = 0x8f
	opPrefetch16      = 0x90
	opSyncCache16     = 0x91
	opWriteSame16     = 0x93
	opWriteAtomic16   = 0x9c
	opServiceActionIn = 0x9e
	opReportLUNs      = 0xa0
	opMaintenanceIn   = 0xa3
	opRead12          = 0xa8
	opWrite12         = 0xaa
	opWriteVerify12   = 0xae
	opVerify12        = 0xaf

	saReadCapacity16 = 0x10
	saReportOpcodes  = 0x0c
)

// u is shorthand for a usage data list.
func u(b ...byte) []byte { return b }

// commands is the command set, in opcode order (the order REPORT
// SUPPORTED OPERATION CODES lists them in).
var commands = []*command{
	{op: opTestUnitReady, usage: u(0x00, 0, 0, 0, 0, 0x04), run: (*session).testUnitReady},
	{op: opRequestSense, usage: u(0x03, 0x01, 0, 0, 0xff, 0x04), run: (*session).requestSense, anyLU: true},
	{op: opFormatUnit, usage: u(0x04, 0xff, 0, 0, 0, 0x04), write: true},
	{op: opReassignBlocks, usage: u(0x07, 0x03, 0, 0, 0, 0x04), write: true},
	{op: opRead6, usage: u(0x08, 0x1f, 0xff, 0xff, 0xff, 0x04), run: (*session).read},
	{op: opWrite6, usage: u(0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04), write: true},
	{op: opInquiry, usage: u(0x12, 0x01, 0xff, 0xff, 0xff, 0x04), run: (*session).inquiry, anyLU: true},
	{op: opModeSense6, usage: u(0x1a, 0x08, 0xff, 0xff, 0xff, 0x04), run: (*session).modeSense},
	{op: opStartStopUnit, usage: u(0x1b, 0x01, 0, 0x0f, 0xf7, 0x04), run: (*session).startStopUnit},
	{op: opPreventAllow, usage: u(0x1e, 0, 0, 0, 0x03, 0x04), run: (*session).preventAllow},
	{op: opReadCapacity10, usage: u(0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04), run: (*session).readCapacity10},
	{op: opRead10, usage: u(0x28, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), run: (*session).read},
	{op: opWrite10, usage: u(0x2a, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), write: true},
	{op: opWriteVerify10, usage: u(0x2e, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), write: true},
	{op: opVerify10, usage: u(0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), run: (*session).verify},
	{op: opPrefetch10, usage: u(0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), run: (*session).prefetch},
	{op: opSyncCache10, usage: u(0x35, 0x06, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), run: (*session).syncCache},
	{op: opWriteLong10, usage: u(0x3f, 0xe0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04), write: true},
	{op: opWriteSame10, usage: u(0x41, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04), write: true},
	{op: opUnmap, usage: u(0x42, 0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x04), write: true},
	{op: opSanitize, usage: u(0x48, 0xff, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04), write: true},
	{op: opModeSense10, usage: u(0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04), run: (*session).modeSense},
	{op: opRead16, usage: u(0x88, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).read},
	{op: opCompareAndWrite, usage: u(0x89, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x04), write: true},
	{op: opWrite16, usage: u(0x8a, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opOrWrite, usage: u(0x8b, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opWriteVerify16, usage: u(0x8e, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opVerify16, usage: u(0x8f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).verify},
	{op: opPrefetch16, usage: u(0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).prefetch},
	{op: opSyncCache16, usage: u(0x91, 0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).syncCache},
	{op: opWriteSame16, usage: u(0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opWriteAtomic16, usage: u(0x9c, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opServiceActionIn, sa: saReadCapacity16, hasSA: true, usage: u(0x9e, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04), run: (*session).readCapacity16},
	{op: opReportLUNs, usage: u(0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04), run: (*session).reportLUNs, anyLU: true},
	{op: opMaintenanceIn, sa: saReportOpcodes, hasSA: true, usage: u(0xa3, saReportOpcodes, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04)}, // run: set by init
	{op: opRead12, usage: u(0xa8, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).read},
	{op: opWrite12, usage: u(0xaa, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opWriteVerify12, usage: u(0xae, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), write: true},
	{op: opVerify12, usage: u(0xaf, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04), run: (*session).verify},
}

// init sets the handler of REPORT SUPPORTED OPERATION CODES, which lists
// the table it is in (a cycle for a composite literal).
func init() {
	lookupCommand([]byte{opMaintenanceIn, saReportOpcodes}).run = (*session).reportOpcodes
}

// byOpcode indexes commands: commands with service actions have several.
var byOpcode = func() map[uint8][]*command {
	m := map[uint8][]*command{}
	for _, c := range commands {
		m[c.op] = append(m[c.op], c)
	}
	return m
}()

// lookupCommand finds the command of a CDB (nil: not supported).
func lookupCommand(cdb []byte) *command {
	for _, c := range byOpcode[cdb[0]] {
		if !c.hasSA || cdb[1]&0x1f == c.sa {
			return c
		}
	}
	return nil
}

// checkReserved returns the index of the first CDB byte with a bit set
// that the command does not use, or -1. The service action and opcode
// bytes are not checked here.
func (c *command) checkReserved(cdb []byte) int {
	for i := 1; i < len(c.usage); i++ {
		mask := c.usage[i]
		if i == 1 && c.hasSA {
			mask |= 0x1f
		}
		if cdb[i]&^mask != 0 {
			return i
		}
	}
	return -1
}

// Reporting options of REPORT SUPPORTED OPERATION CODES.
const (
	rsocAll      = 0
	rsocOpcode   = 1 // one command without service action
	rsocSA       = 2 // one command with service action
	rsocOpcodeSA = 3 // one command, with or without service action
)

// commandTimeouts is a command timeouts descriptor: no nominal or
// recommended timeout known.
var commandTimeouts = []byte{0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// reportOpcodes answers REPORT SUPPORTED OPERATION CODES.
func (s *session) reportOpcodes(c *scsiCmd) result {
	cdb := c.cdb
	rctd := cdb[2]&0x80 != 0
	opts := cdb[2] & 0x07
	reqOp, reqSA := cdb[3], binary.BigEndian.Uint16(cdb[4:])
	alloc := int(binary.BigEndian.Uint32(cdb[6:]))
	switch opts {
	case rsocAll:
		return dataIn(allOpcodes(rctd), alloc)
	case rsocOpcode, rsocSA, rsocOpcodeSA:
		out, ok := oneOpcode(opts, reqOp, reqSA, rctd)
		if !ok {
			return checkCondition(invalidField(2))
		}
		return dataIn(out, alloc)
	default:
		return checkCondition(invalidField(2))
	}
}

// allOpcodes is the "all commands" format: one descriptor per command,
// with timeouts descriptors when rctd is set.
func allOpcodes(rctd bool) []byte {
	out := make([]byte, 4)
	for _, cmd := range commands {
		d := make([]byte, 8)
		d[0] = cmd.op
		if cmd.hasSA {
			binary.BigEndian.PutUint16(d[2:], uint16(cmd.sa))
			d[5] |= 0x01 // SERVACTV
		}
		if rctd {
			d[5] |= 0x02 // CTDP
		}
		binary.BigEndian.PutUint16(d[6:], uint16(len(cmd.usage)))
		out = append(out, d...)
		if rctd {
			out = append(out, commandTimeouts...)
		}
	}
	binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	return out
}

// oneOpcode is the "one command" format for the requested operation code
// (and service action); ok is false when the request's reporting option
// does not match whether the command has service actions.
func oneOpcode(opts, reqOp byte, reqSA uint16, rctd bool) (out []byte, ok bool) {
	var found *command
	sawSA := false
	for _, cmd := range byOpcode[reqOp] {
		sawSA = sawSA || cmd.hasSA
		if !cmd.hasSA || uint16(cmd.sa) == reqSA {
			found = cmd
		}
	}
	switch {
	case opts == rsocOpcode && sawSA, opts == rsocSA && len(byOpcode[reqOp]) > 0 && !sawSA:
		return nil, false
	case opts == rsocSA && found != nil && !found.hasSA:
		return nil, false
	}
	out = make([]byte, 4)
	if found == nil {
		out[1] = 0x01 // not supported
		return out, true
	}
	out[1] = 0x03 // supported, conforming to a standard
	if rctd {
		out[1] |= 0x80
	}
	binary.BigEndian.PutUint16(out[2:], uint16(len(found.usage)))
	out = append(out, found.usage...)
	if rctd {
		out = append(out, commandTimeouts...)
	}
	return out, true
}
