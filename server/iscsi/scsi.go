package iscsi

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
)

// Geometry of every disk.
const (
	blockSize      = 512
	blocksPerPhys  = 8     // 4 KiB physical blocks (LBPPBE 3)
	maxXferBlocks  = 16384 // 8 MiB: MAXIMUM TRANSFER LENGTH of the block limits
	optXferBlocks  = 2048  // 1 MiB: OPTIMAL TRANSFER LENGTH
	lbppbeExponent = 3
)

// scsiCmd is a SCSI command during its execution.
type scsiCmd struct {
	t    *task
	cdb  []byte // 16 bytes
	lun  uint64
	edtl int64 // expected data transfer length
}

// result is what a command produced: a status with sense data, and
// Data-In from memory or from the disk.
type result struct {
	status uint8
	sense  sense
	src    Data  // Data-In, from offset 0
	length int64 // bytes the command transfers (in either direction) by its CDB
	abort  bool  // the task was aborted: no response
	err    error // the connection failed
}

func good() result { return result{status: statusGood} }

func checkCondition(s sense) result { return result{status: statusCheckCondition, sense: s} }

// dataIn returns data truncated to the allocation length.
func dataIn(b []byte, alloc int) result {
	if len(b) > alloc {
		b = b[:alloc]
	}
	return result{status: statusGood, src: memData(b), length: int64(len(b))}
}

// scsi executes a command and sends its data and status.
func (s *session) scsi(t *task) error {
	p := t.pdu
	c := &scsiCmd{t: t, cdb: p.BHS[32:48], lun: p.LUN(), edtl: int64(p.U32(20))}
	res := s.execCDB(c)
	if res.err != nil {
		return res.err
	}
	if res.abort {
		s.retire(!t.immediate)
		return nil
	}
	if res.status == statusCheckCondition {
		s.logAt(slog.LevelDebug, "SCSI command failed", "cdb", fmt.Sprintf("% x", c.cdb), "edtl", c.edtl,
			"sense", fmt.Sprintf("%#x/%#04x", res.sense.key, res.sense.ascq))
	}
	return s.respond(c, res)
}

// execCDB runs the command of a CDB.
func (s *session) execCDB(c *scsiCmd) result {
	cmd := lookupCommand(c.cdb)
	if cmd == nil {
		return checkCondition(senseInvalidOpcode)
	}
	if c.lun != 0 && !cmd.anyLU {
		return checkCondition(senseLUN)
	}
	if cmd.write {
		return checkCondition(senseWriteProtect)
	}
	if i := cmd.checkReserved(c.cdb); i >= 0 {
		return checkCondition(invalidField(i))
	}
	return cmd.run(s, c)
}

// respond sends a command's Data-In and status. Good status rides on the
// last Data-In PDU; sense data goes in a SCSI Response.
func (s *session) respond(c *scsiCmd, res result) error {
	t := c.t
	var n int64
	if res.src != nil && (res.status == statusGood || res.status == statusConditionMet) {
		n = min(res.length, c.edtl)
	}
	var resFlags uint8
	var residual uint32
	if res.status == statusGood || res.status == statusConditionMet {
		switch {
		case res.length > c.edtl:
			resFlags, residual = flagOverflow, uint32(min(res.length-c.edtl, 0xffffffff))
		case res.length < c.edtl:
			resFlags, residual = flagUnder, uint32(c.edtl-res.length)
		}
	}
	// The window slot frees up with the response, so that its MaxCmdSN
	// already counts it.
	s.retire(!t.immediate)
	seg := int64(min(s.p.maxSendData, maxDataInSegment))
	burst := int64(s.p.maxBurst)
	piggyback := res.status == statusGood && n > 0
	var dataSN uint32
	for off := int64(0); off < n; {
		k := min(seg, n-off, burst-off%burst)
		last := off+k == n
		h := newBHS(OpDataIn, 0)
		if last || (off+k)%burst == 0 {
			h[1] |= flagFinal
		}
		mode := statNone
		if last && piggyback {
			if !s.claimResponse(t) {
				return nil // aborted: the rest is not sent
			}
			h[1] |= flagStatus | resFlags
			h[3] = res.status
			h.SetU32(44, residual)
			mode = statAdvance
		}
		copy(h[8:16], t.pdu.BHS[8:16])
		h.SetU32(16, t.itt)
		h.SetU32(20, reserved)
		h.SetU32(36, dataSN)
		h.SetU32(40, uint32(off))
		if err := s.sendData(&h, res.src, off, k, mode); err != nil {
			return err
		}
		dataSN++
		off += k
	}
	if piggyback {
		return nil
	}
	if !s.claimResponse(t) {
		return nil
	}
	h := newBHS(OpSCSIResp, flagFinal|resFlags)
	h[3] = res.status
	h.SetU32(16, t.itt)
	h.SetU32(36, dataSN+t.r2ts) // ExpDataSN: R2T and Data-In PDUs sent
	h.SetU32(44, residual)
	var data []byte
	if res.status == statusCheckCondition {
		sd := res.sense.fixed()
		data = make([]byte, 2+len(sd))
		binary.BigEndian.PutUint16(data, uint16(len(sd)))
		copy(data[2:], sd)
	}
	return s.send(&h, data, statAdvance)
}

// claimResponse marks the task answered; false if it was aborted first.
func (s *session) claimResponse(t *task) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.state == taskAborted {
		return false
	}
	t.state = taskResponded
	return true
}

// memData is Data in memory.
type memData []byte

func (m memData) SendTo(c net.Conn, hdr []byte, off, n int64) error {
	_, err := c.Write(append(hdr[:len(hdr):len(hdr)], m[off:off+n]...))
	return err
}

func (m memData) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m[off:]), nil
}

// numBlocks returns the disk's size in logical blocks.
func (s *session) numBlocks() uint64 { return uint64(s.disk.Size()) / blockSize }

// lbaRange decodes the LBA and block count of the read, verify, pre-fetch
// and sync commands (READ(6): a count of 0 means 256).
func lbaRange(cdb []byte) (lba uint64, blocks uint32) {
	switch cdb[0] {
	case opRead6:
		lba = uint64(cdb[1]&0x1f)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3])
		blocks = uint32(cdb[4])
		if blocks == 0 {
			blocks = 256
		}
	case opRead10, opVerify10, opPrefetch10, opSyncCache10:
		lba = uint64(binary.BigEndian.Uint32(cdb[2:]))
		blocks = uint32(binary.BigEndian.Uint16(cdb[7:]))
	case opRead12, opVerify12:
		lba = uint64(binary.BigEndian.Uint32(cdb[2:]))
		blocks = binary.BigEndian.Uint32(cdb[6:])
	default: // 16-byte CDBs
		lba = binary.BigEndian.Uint64(cdb[2:])
		blocks = binary.BigEndian.Uint32(cdb[10:])
	}
	return lba, blocks
}

// lengthField is the index of the CDB byte where the transfer length
// starts (for the sense field pointer).
func lengthField(op uint8) int {
	switch op {
	case opRead6:
		return 4
	case opRead10, opVerify10, opPrefetch10, opSyncCache10:
		return 7
	case opRead12, opVerify12:
		return 6
	}
	return 10
}

// checkRange checks that [lba, lba+blocks) is on the disk.
func (s *session) checkRange(lba uint64, blocks uint32) bool {
	end := lba + uint64(blocks)
	return end >= lba && lba <= s.numBlocks() && end <= s.numBlocks()
}

// read answers READ(6/10/12/16): the data comes through the disk's read
// path (on a proxy, absent blocks from the uplink).
func (s *session) read(c *scsiCmd) result {
	lba, blocks := lbaRange(c.cdb)
	if c.cdb[0] != opRead6 && c.cdb[1]&0xe0 != 0 {
		return checkCondition(invalidField(1)) // RDPROTECT: no protection information
	}
	if !s.checkRange(lba, blocks) {
		return checkCondition(senseLBARange)
	}
	if blocks > maxXferBlocks {
		return checkCondition(invalidField(lengthField(c.cdb[0])))
	}
	n := int64(blocks) * blockSize
	want := min(n, c.edtl)
	if want == 0 {
		return result{status: statusGood, length: n}
	}
	d, res := s.diskRead(c, int64(lba)*blockSize, want)
	if d == nil {
		return res
	}
	return result{status: statusGood, src: d, length: n}
}

// diskRead reads through the disk; on failure it returns the result to
// answer with.
func (s *session) diskRead(c *scsiCmd, off, n int64) (Data, result) {
	d, err := s.disk.Read(c.t.ctx, off, n)
	switch {
	case err == nil:
		return d, result{}
	case c.t.ctx.Err() != nil:
		return nil, result{abort: true}
	default:
		s.logAt(slog.LevelWarn, "iSCSI read failed: MEDIUM ERROR", "offset", off, "size", n, "err", err)
		return nil, checkCondition(senseMedium)
	}
}

// testUnitReady: the medium is always ready.
func (s *session) testUnitReady(*scsiCmd) result { return good() }

// requestSense returns "no sense": sense data always goes with the status
// (autosense), none is left pending. For a LUN that does not exist the
// sense says so.
func (s *session) requestSense(c *scsiCmd) result {
	sn := sense{key: senseNoSense}
	if c.lun != 0 {
		sn = senseLUN
	}
	var b []byte
	if c.cdb[1]&0x01 != 0 { // DESC: descriptor format
		b = []byte{0x72, sn.key, byte(sn.ascq >> 8), byte(sn.ascq), 0, 0, 0, 0}
	} else {
		b = sn.fixed()
	}
	return dataIn(b, int(c.cdb[4]))
}

// startStopUnit accepts every power condition; the disk never stops. The
// medium cannot be ejected: LOEJ with START 0 is refused while a PREVENT
// is in effect, as SBC wants, and is a no-op otherwise.
func (s *session) startStopUnit(c *scsiCmd) result {
	loej, start := c.cdb[4]&0x02 != 0, c.cdb[4]&0x01 != 0
	if c.cdb[4]>>4 == 0 && loej && !start && s.prevent {
		return checkCondition(sense{key: senseIllegalRequest, ascq: 0x5302}) // MEDIUM REMOVAL PREVENTED
	}
	return good()
}

// preventAllow records PREVENT ALLOW MEDIUM REMOVAL (cleared by a LUN or
// target reset and by the end of the session).
func (s *session) preventAllow(c *scsiCmd) result {
	s.prevent = c.cdb[4]&0x03 != 0
	return good()
}

// readCapacity10 answers READ CAPACITY(10).
func (s *session) readCapacity10(c *scsiCmd) result {
	if c.cdb[8]&0x01 == 0 && binary.BigEndian.Uint32(c.cdb[2:]) != 0 {
		return checkCondition(invalidField(2)) // an LBA without PMI
	}
	last := s.numBlocks() - 1
	b := make([]byte, 8)
	binary.BigEndian.PutUint32(b, uint32(min(last, 0xffffffff)))
	binary.BigEndian.PutUint32(b[4:], blockSize)
	return dataIn(b, 8)
}

// readCapacity16 answers READ CAPACITY(16): 512-byte logical blocks in
// 4 KiB physical blocks, no protection, no thin provisioning.
func (s *session) readCapacity16(c *scsiCmd) result {
	b := make([]byte, 32)
	binary.BigEndian.PutUint64(b, s.numBlocks()-1)
	binary.BigEndian.PutUint32(b[8:], blockSize)
	b[13] = lbppbeExponent
	return dataIn(b, int(binary.BigEndian.Uint32(c.cdb[10:])))
}

// reportLUNs answers REPORT LUNS: LUN 0.
func (s *session) reportLUNs(c *scsiCmd) result {
	alloc := int(binary.BigEndian.Uint32(c.cdb[6:]))
	if alloc < 16 {
		return checkCondition(invalidField(6))
	}
	b := make([]byte, 16)
	switch c.cdb[2] {
	case 0x00, 0x02: // all logical units
		binary.BigEndian.PutUint32(b, 8)
	case 0x01, 0x10, 0x11, 0x12: // well-known or administrative LUs: none
		b = b[:8]
	default:
		return checkCondition(invalidField(2))
	}
	return dataIn(b, alloc)
}

// syncCache: nothing is ever written, so nothing to flush; the range is
// checked (0 blocks: to the end of the disk).
func (s *session) syncCache(c *scsiCmd) result {
	lba, blocks := lbaRange(c.cdb)
	if !s.checkRange(lba, blocks) {
		return checkCondition(senseLBARange)
	}
	return good()
}

// prefetch reads the range through the disk (a proxy fetches what it
// lacks), and answers CONDITION MET: the blocks are in the cache.
func (s *session) prefetch(c *scsiCmd) result {
	lba, blocks := lbaRange(c.cdb)
	if !s.checkRange(lba, blocks) {
		return checkCondition(senseLBARange)
	}
	if blocks > maxXferBlocks {
		return checkCondition(invalidField(lengthField(c.cdb[0])))
	}
	if blocks == 0 {
		return result{status: statusConditionMet}
	}
	if _, res := s.diskRead(c, int64(lba)*blockSize, int64(blocks)*blockSize); res.status != 0 || res.abort {
		return res
	}
	return result{status: statusConditionMet}
}
