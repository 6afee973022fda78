package iscsi

import (
	"bytes"
	"errors"
	"fmt"
	"time"
)

// VERIFY with a byte compare is the one command that takes data from the
// initiator: the Data-Out buffer comes as immediate data and then in
// bursts the target solicits with R2Ts (InitialR2T is always Yes, so
// nothing comes unsolicited). It is compared as it arrives, never stored.

// Byte check modes of VERIFY (BYTCHK).
const (
	bytchkNone = 0 // verify the medium only
	bytchkAll  = 1 // compare the Data-Out buffer with the range
	bytchkOne  = 3 // compare one block with each block of the range
)

// needsDataOut reports whether a command takes a Data-Out buffer we read:
// VERIFY with a byte compare.
func needsDataOut(p *PDU) bool {
	switch p.BHS[32] {
	case opVerify10, opVerify12, opVerify16:
		b := p.BHS[33] >> 1 & 3
		return (b == bytchkAll || b == bytchkOne) && p.U32(20) > 0
	}
	return false
}

// verify answers VERIFY(10/12/16).
func (s *session) verify(c *scsiCmd) result {
	lba, blocks := lbaRange(c.cdb)
	bytchk := c.cdb[1] >> 1 & 3
	switch {
	case c.cdb[1]&0xe0 != 0: // VRPROTECT: no protection information
		return checkCondition(invalidField(1))
	case bytchk == 2:
		return checkCondition(invalidField(1))
	case !s.checkRange(lba, blocks):
		return checkCondition(senseLBARange)
	case blocks > maxXferBlocks:
		return checkCondition(invalidField(lengthField(c.cdb[0])))
	}
	var expect int64 // Data-Out bytes the CDB asks for
	switch {
	case blocks == 0:
	case bytchk == bytchkAll:
		expect = int64(blocks) * blockSize
	case bytchk == bytchkOne:
		expect = blockSize
	}
	if blocks == 0 {
		return result{status: statusGood}
	}
	d, res := s.diskRead(c, int64(lba)*blockSize, int64(blocks)*blockSize)
	if d == nil {
		return res
	}
	if bytchk == bytchkNone {
		return good()
	}
	cmp := &comparer{d: d, oneBlock: bytchk == bytchkOne, blocks: int64(blocks), first: -1}
	if err := s.receive(c, min(expect, c.edtl), cmp.add); err != nil {
		if errors.Is(err, errAborted) {
			return result{abort: true}
		}
		return result{err: err}
	}
	if cmp.err != nil {
		return result{err: cmp.err}
	}
	if cmp.first >= 0 {
		return checkCondition(sense{key: senseMiscompare, ascq: ascMiscompare, info: uint64(cmp.first), infoValid: true})
	}
	return result{status: statusGood, length: expect}
}

// comparer compares Data-Out pieces with the disk.
type comparer struct {
	d        Data
	oneBlock bool  // the buffer is one block, compared with every block
	blocks   int64 // blocks in the range
	first    int64 // offset of the first difference, -1: none yet
	block    []byte
	err      error
}

// add compares the piece of the Data-Out buffer at off.
func (c *comparer) add(p []byte, off int64) {
	if c.first >= 0 || c.err != nil || len(p) == 0 {
		return
	}
	if c.oneBlock {
		c.block = append(c.block, p...)
		if len(c.block) < blockSize {
			return
		}
		disk := make([]byte, blockSize)
		for i := int64(0); i < c.blocks; i++ {
			if _, c.err = c.d.ReadAt(disk, i*blockSize); c.err != nil {
				return
			}
			if j := firstDiff(c.block, disk); j >= 0 {
				c.first = i*blockSize + int64(j)
				return
			}
		}
		return
	}
	disk := make([]byte, len(p))
	if _, c.err = c.d.ReadAt(disk, off); c.err != nil {
		return
	}
	if j := firstDiff(p, disk); j >= 0 {
		c.first = off + int64(j)
	}
}

// firstDiff returns the index of the first byte where a and b differ, -1
// if they are equal.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

var errAborted = errors.New("iscsi: task aborted")

// receive takes total bytes of a command's Data-Out buffer: its immediate
// data, then solicited bursts. Each piece goes to add. A Data-Out PDU out
// of sequence ends the connection (ErrorRecoveryLevel 0).
func (s *session) receive(c *scsiCmd, total int64, add func([]byte, int64)) error {
	t := c.t
	imm := t.pdu.Data
	if int64(len(imm)) > total {
		imm = imm[:total]
	}
	add(imm, 0)
	t.pdu.Data = nil
	got := int64(len(imm))
	var r2tsn uint32
	for got < total {
		want := min(total-got, int64(s.p.maxBurst))
		s.nextTTT++
		if s.nextTTT == reserved || s.nextTTT == pingTag || s.nextTTT == textTag {
			s.nextTTT = 1
		}
		ttt := s.nextTTT
		h := newBHS(OpR2T, flagFinal)
		copy(h[8:16], t.pdu.BHS[8:16])
		h.SetU32(16, t.itt)
		h.SetU32(20, ttt)
		h.SetU32(36, r2tsn)
		h.SetU32(40, uint32(got))
		h.SetU32(44, uint32(want))
		if err := s.send(&h, nil, statCurrent); err != nil {
			return err
		}
		r2tsn++
		t.r2ts = r2tsn
		var burst int64
		var dataSN uint32
		timer := time.NewTimer(4 * s.t.cfg.Timeout())
		for burst < want {
			var p *PDU
			select {
			case p = <-t.dataOut:
			case <-t.ctx.Done():
				timer.Stop()
				return errAborted
			case <-timer.C:
				return fmt.Errorf("%w: %d of %d bytes", errNoData, got+burst, total)
			}
			n := int64(len(p.Data))
			switch {
			case p.U32(20) != ttt, p.U32(36) != dataSN, int64(p.U32(40)) != got+burst, burst+n > want:
				timer.Stop()
				return fmt.Errorf("iscsi: Data-Out out of sequence (TTT %#x DataSN %d offset %d length %d)", p.U32(20), p.U32(36), p.U32(40), n)
			case p.Flags()&flagFinal != 0 && burst+n != want:
				timer.Stop()
				return fmt.Errorf("iscsi: Data-Out burst ended after %d of %d bytes", burst+n, want)
			}
			add(p.Data, got+burst)
			burst += n
			dataSN++
		}
		timer.Stop()
		got += want
	}
	return nil
}

// errNoData is returned when the initiator does not send solicited data.
var errNoData = errors.New("iscsi: solicited data did not arrive")
