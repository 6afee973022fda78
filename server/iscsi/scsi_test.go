package iscsi

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/iscsitest"
)

func cdb16(op byte, lba uint64, blocks uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], blocks)
	return c
}

func cdb10(op byte, b1 byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 10)
	c[0], c[1] = op, b1
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

// expectSense runs a command and checks its CHECK CONDITION.
func expectSense(t *testing.T, ic *iscsitest.Conn, name string, cdb []byte, edtl uint32, key uint8, ascq uint16) {
	t.Helper()
	res, err := ic.Command(cdb, edtl, nil)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	k, a := res.SenseKey()
	if res.Status != statusCheckCondition || k != key || a != ascq {
		t.Fatalf("%s: status %#x sense %#x/%#04x, want CHECK CONDITION %#x/%#04x", name, res.Status, k, a, key, ascq)
	}
}

// expectGood runs a command and returns its data.
func expectGood(t *testing.T, ic *iscsitest.Conn, name string, cdb []byte, edtl uint32) *iscsitest.Result {
	t.Helper()
	res, err := ic.Command(cdb, edtl, nil)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if res.Status != statusGood && res.Status != statusConditionMet {
		k, a := res.SenseKey()
		t.Fatalf("%s: status %#x sense %#x/%#04x", name, res.Status, k, a)
	}
	return res
}

// The read commands return the disk's bytes, through several Data-In
// PDUs for large reads, and check their ranges.
func TestReads(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{Keys: []string{"MaxRecvDataSegmentLength=4096", "MaxBurstLength=16384"}})
	disk := tt.disk.data
	blocks := uint64(len(disk) / 512)

	r6 := []byte{opRead6, 0, 0, 5, 0, 0} // 0 blocks = 256
	res := expectGood(t, ic, "READ(6)", r6, 256*512)
	if !bytes.Equal(res.Data, disk[5*512:261*512]) || res.DataPDUs != 32 {
		t.Fatalf("READ(6) of 256 blocks: %d bytes in %d PDUs", len(res.Data), res.DataPDUs)
	}
	res = expectGood(t, ic, "READ(10)", cdb10(opRead10, 0x18, 100, 9), 9*512) // DPO, FUA
	if !bytes.Equal(res.Data, disk[100*512:109*512]) {
		t.Fatal("READ(10) data differs")
	}
	r12 := make([]byte, 12)
	r12[0] = opRead12
	binary.BigEndian.PutUint32(r12[2:], uint32(blocks-1))
	binary.BigEndian.PutUint32(r12[6:], 1)
	res = expectGood(t, ic, "READ(12)", r12, 512)
	if !bytes.Equal(res.Data, disk[len(disk)-512:]) {
		t.Fatal("READ(12) of the last block differs")
	}
	res = expectGood(t, ic, "READ(16)", cdb16(opRead16, 7, 0), 0)
	if len(res.Data) != 0 || res.Flags != 0 {
		t.Fatalf("READ(16) of 0 blocks: %d bytes, flags %#x", len(res.Data), res.Flags)
	}

	expectSense(t, ic, "READ beyond the end", cdb16(opRead16, blocks-1, 2), 1024, senseIllegalRequest, ascLBAOutOfRange)
	expectSense(t, ic, "READ at the end+1", cdb16(opRead16, blocks+1, 0), 0, senseIllegalRequest, ascLBAOutOfRange)
	expectSense(t, ic, "READ wrapping around", cdb16(opRead16, 1<<64-1, 2), 1024, senseIllegalRequest, ascLBAOutOfRange)
	expectSense(t, ic, "RDPROTECT", cdb10(opRead10, 0x20, 0, 1), 512, senseIllegalRequest, ascInvalidFieldInCDB)
	expectSense(t, ic, "beyond the end and over the transfer limit", cdb16(opRead16, 0, maxXferBlocks+1), 512, senseIllegalRequest, ascLBAOutOfRange)
}

// Residuals as RFC 7143 wants them: the target sends at most the expected
// data transfer length and reports what was left over or missing.
func TestResiduals(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{})
	cases := []struct {
		name     string
		cdb      []byte
		edtl     uint32
		n        int
		flags    uint8
		residual uint32
	}{
		{"exact", cdb10(opRead10, 0, 0, 1), 512, 512, 0, 0},
		{"EDTL 0", cdb10(opRead10, 0, 0, 1), 0, 0, flagOverflow, 512},
		{"EDTL 10000", cdb10(opRead10, 0, 0, 1), 10000, 512, flagUnder, 10000 - 512},
		{"EDTL 200", cdb10(opRead10, 0, 0, 1), 200, 200, flagOverflow, 312},
		{"EDTL 201 (padding)", cdb10(opRead10, 0, 0, 1), 201, 201, flagOverflow, 311},
		{"two blocks, EDTL one", cdb10(opRead10, 0, 0, 2), 512, 512, flagOverflow, 512},
		{"INQUIRY short data", []byte{opInquiry, 0, 0, 0, 255, 0}, 255, 74, flagUnder, 255 - 74},
		{"INQUIRY truncated", []byte{opInquiry, 0, 0, 0, 255, 0}, 36, 36, flagOverflow, 74 - 36},
		{"TEST UNIT READY with EDTL", []byte{opTestUnitReady, 0, 0, 0, 0, 0}, 100, 0, flagUnder, 100},
	}
	for _, c := range cases {
		res := expectGood(t, ic, c.name, c.cdb, c.edtl)
		if len(res.Data) != c.n || res.Flags != c.flags || res.Residual != c.residual {
			t.Errorf("%s: %d bytes, flags %#x, residual %d; want %d, %#x, %d", c.name, len(res.Data), res.Flags, res.Residual, c.n, c.flags, c.residual)
		}
		if c.n > 0 && c.cdb[0] == opRead10 && !bytes.Equal(res.Data, tt.disk.data[:c.n]) {
			t.Errorf("%s: data differs", c.name)
		}
	}
}

// Every write-type command fails with DATA PROTECT / WRITE PROTECTED,
// and its immediate data does not disturb the stream.
func TestWriteProtect(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{})
	before := append([]byte(nil), tt.disk.data...)
	for _, c := range commands {
		if !c.write {
			continue
		}
		cdb := make([]byte, len(c.usage))
		cdb[0] = c.op
		res, err := ic.Command(cdb, 512, bytes.Repeat([]byte{0xee}, 512))
		if err != nil {
			t.Fatalf("opcode %#x: %v", c.op, err)
		}
		if k, a := res.SenseKey(); res.Status != statusCheckCondition || k != senseDataProtect || a != ascWriteProtected || res.R2Ts != 0 {
			t.Fatalf("opcode %#x: status %#x sense %#x/%#04x, %d R2Ts", c.op, res.Status, k, a, res.R2Ts)
		}
	}
	if !bytes.Equal(before, tt.disk.data) {
		t.Fatal("the disk changed")
	}
	// MODE SENSE says so: the WP bit in both header formats.
	res := expectGood(t, ic, "MODE SENSE(6)", []byte{opModeSense6, 0, 0x3f, 0, 255, 0}, 255)
	if res.Data[2]&writeProtect == 0 || int(res.Data[0]) != len(res.Data)-1 || res.Data[3] != 8 {
		t.Fatalf("MODE SENSE(6) header % x", res.Data[:4])
	}
	res = expectGood(t, ic, "MODE SENSE(10)", []byte{opModeSense10, 0x10, 0x3f, 0, 0, 0, 0, 0, 255, 0}, 255)
	if res.Data[3]&writeProtect == 0 || res.Data[4] != 1 || binary.BigEndian.Uint16(res.Data[6:]) != 16 ||
		binary.BigEndian.Uint64(res.Data[8:]) != uint64(len(tt.disk.data)/512) {
		t.Fatalf("MODE SENSE(10) LLBAA header and descriptor % x", res.Data[:24])
	}
	expectSense(t, ic, "saved values", []byte{opModeSense6, 0, 0xff, 0, 255, 0}, 255, senseIllegalRequest, ascSavingNotSupported)
	expectSense(t, ic, "unknown page", []byte{opModeSense6, 0, 0x01, 0, 255, 0}, 255, senseIllegalRequest, ascInvalidFieldInCDB)
}

// INQUIRY: the reference's identity (vendor, product = name, revision =
// rid), the VPD pages with the WWN, block limits consistent with the
// command checks; READ CAPACITY; REPORT LUNS; other LUNs.
func TestInquiryAndCapacity(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{})
	res := expectGood(t, ic, "INQUIRY", []byte{opInquiry, 0, 0, 0, 255, 0}, 255)
	d := res.Data
	if d[0] != 0 || string(d[8:16]) != "UNI FRBG" || strings.TrimRight(string(d[16:32]), " ") != "disk" || string(d[32:36]) != "0003" {
		t.Fatalf("standard INQUIRY % x", d[:36])
	}
	res = expectGood(t, ic, "VPD 0x00", []byte{opInquiry, 1, 0, 0, 255, 0}, 255)
	if !bytes.Equal(res.Data[4:], []byte{0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2}) {
		t.Fatalf("supported pages % x", res.Data)
	}
	res = expectGood(t, ic, "VPD 0x83", []byte{opInquiry, 1, 0x83, 0, 255, 0}, 255)
	if res.Data[4+1] != 0x03 || binary.BigEndian.Uint64(res.Data[8:]) != tt.disk.WWN() {
		t.Fatalf("device identification % x", res.Data)
	}
	if !bytes.Contains(res.Data, []byte("UNI FRBGdisk:3")) {
		t.Fatalf("no T10 vendor ID with name:rid in % q", res.Data)
	}
	res = expectGood(t, ic, "VPD 0x80", []byte{opInquiry, 1, 0x80, 0, 255, 0}, 255)
	if string(res.Data[4:]) != "disk" {
		t.Fatalf("serial %q", res.Data[4:])
	}
	res = expectGood(t, ic, "VPD 0xB0", []byte{opInquiry, 1, 0xb0, 0, 255, 0}, 255)
	if binary.BigEndian.Uint16(res.Data[2:]) != 0x3c || binary.BigEndian.Uint32(res.Data[8:]) != maxXferBlocks {
		t.Fatalf("block limits % x", res.Data[:16])
	}
	expectGood(t, ic, "VPD 0xB1", []byte{opInquiry, 1, 0xb1, 0, 255, 0}, 255)
	expectGood(t, ic, "VPD 0xB2", []byte{opInquiry, 1, 0xb2, 0, 255, 0}, 255)
	expectSense(t, ic, "VPD 0x99", []byte{opInquiry, 1, 0x99, 0, 255, 0}, 255, senseIllegalRequest, ascInvalidFieldInCDB)
	expectSense(t, ic, "page without EVPD", []byte{opInquiry, 0, 0x80, 0, 255, 0}, 255, senseIllegalRequest, ascInvalidFieldInCDB)

	blocks, size, err := ic.Capacity()
	if err != nil || size != 512 || blocks != uint64(len(tt.disk.data)/512) {
		t.Fatalf("READ CAPACITY(16): %d blocks of %d, %v", blocks, size, err)
	}
	res = expectGood(t, ic, "READ CAPACITY(10)", []byte{opReadCapacity10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 8)
	if binary.BigEndian.Uint32(res.Data) != uint32(blocks-1) || binary.BigEndian.Uint32(res.Data[4:]) != 512 {
		t.Fatalf("READ CAPACITY(10) % x", res.Data)
	}
	res = expectGood(t, ic, "REPORT LUNS", []byte{opReportLUNs, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0}, 64)
	if !bytes.Equal(res.Data, []byte{0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("REPORT LUNS % x", res.Data)
	}
	// LUN 1 does not exist: INQUIRY says so, other commands fail.
	r, err := ic.CommandLUN(1, []byte{opInquiry, 0, 0, 0, 96, 0}, 96, nil)
	if err != nil || r.Status != 0 || r.Data[0] != 0x7f {
		t.Fatalf("INQUIRY of LUN 1: %v % x", err, r.Data)
	}
	r, err = ic.CommandLUN(1, []byte{opTestUnitReady, 0, 0, 0, 0, 0}, 0, nil)
	if k, a := r.SenseKey(); err != nil || k != senseIllegalRequest || a != ascLUNNotSupported {
		t.Fatalf("TEST UNIT READY of LUN 1: %v %#x/%#04x", err, k, a)
	}
	expectSense(t, ic, "unknown opcode", []byte{0xc5, 0, 0, 0, 0, 0}, 0, senseIllegalRequest, ascInvalidOpcode)
	expectSense(t, ic, "reserved bit", []byte{opTestUnitReady, 0x01, 0, 0, 0, 0}, 0, senseIllegalRequest, ascInvalidFieldInCDB)
	expectGood(t, ic, "SYNCHRONIZE CACHE(10)", cdb10(opSyncCache10, 0, 0, 0), 0)
	expectGood(t, ic, "START STOP UNIT", []byte{opStartStopUnit, 0, 0, 0, 1, 0}, 0)
	if r := expectGood(t, ic, "PRE-FETCH(16)", cdb16(opPrefetch16, 0, 64), 0); r.Status != statusConditionMet {
		t.Fatalf("PRE-FETCH status %#x", r.Status)
	}
	expectGood(t, ic, "PREVENT", []byte{opPreventAllow, 0, 0, 0, 1, 0}, 0)
	expectSense(t, ic, "eject while prevented", []byte{opStartStopUnit, 0, 0, 0, 2, 0}, 0, senseIllegalRequest, 0x5302)
}

// REPORT SUPPORTED OPERATION CODES lists the command table; one-command
// queries return the usage data; reporting options that do not fit the
// command are refused.
func TestReportOpcodes(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{})
	rsoc := func(opts, op byte, sa uint16) []byte {
		c := []byte{opMaintenanceIn, saReportOpcodes, opts, op, byte(sa >> 8), byte(sa), 0, 0, 0xff, 0xff, 0, 0}
		return c
	}
	res := expectGood(t, ic, "all", rsoc(0x80, 0, 0), 0xffff)
	if n := int(binary.BigEndian.Uint32(res.Data)); n != len(commands)*20 {
		t.Fatalf("all commands with timeouts: %d bytes, want %d", n, len(commands)*20)
	}
	res = expectGood(t, ic, "READ(10)", rsoc(1, opRead10, 0), 0xffff)
	if res.Data[1]&7 != 3 || !bytes.Equal(res.Data[4:], lookupCommand([]byte{opRead10, 0}).usage) {
		t.Fatalf("READ(10) one command % x", res.Data)
	}
	res = expectGood(t, ic, "READ CAPACITY(16)", rsoc(2, opServiceActionIn, saReadCapacity16), 0xffff)
	if res.Data[4] != opServiceActionIn || res.Data[5] != saReadCapacity16 {
		t.Fatalf("READ CAPACITY(16) usage % x", res.Data)
	}
	res = expectGood(t, ic, "unsupported", rsoc(1, 0xc5, 0), 0xffff)
	if res.Data[1]&7 != 1 {
		t.Fatalf("unsupported opcode reported as % x", res.Data)
	}
	expectSense(t, ic, "SA command without SA", rsoc(1, opServiceActionIn, 0), 0xffff, senseIllegalRequest, ascInvalidFieldInCDB)
	expectSense(t, ic, "SA option for a plain command", rsoc(2, opRead10, 0), 0xffff, senseIllegalRequest, ascInvalidFieldInCDB)
}

// VERIFY with a byte compare takes the Data-Out buffer as immediate data
// and through R2Ts, and reports the offset of the first difference.
func TestVerifyCompare(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{Keys: []string{"MaxBurstLength=16384"}})
	disk := tt.disk.data
	const lba, blocks = 40, 200 // 100 KiB: immediate data, then 6 bursts
	buf := append([]byte(nil), disk[lba*512:(lba+blocks)*512]...)
	res, err := ic.Command(cdb10(opVerify10, 0x02, lba, blocks), blocks*512, buf)
	if err != nil || res.Status != statusGood || res.R2Ts == 0 {
		t.Fatalf("VERIFY of equal data: %v status %#x, %d R2Ts", err, res.Status, res.R2Ts)
	}
	buf[77777] ^= 0x58
	res, err = ic.Command(cdb10(opVerify10, 0x02, lba, blocks), blocks*512, buf)
	if err != nil {
		t.Fatal(err)
	}
	if k, a := res.SenseKey(); res.Status != statusCheckCondition || k != senseMiscompare || a != ascMiscompare ||
		binary.BigEndian.Uint32(res.Sense[3:]) != 77777 || res.Sense[0]&0x80 == 0 {
		t.Fatalf("VERIFY of different data: status %#x sense % x", res.Status, res.Sense)
	}
	// BYTCHK 11: one block compared with each block of the range.
	same := bytes.Repeat([]byte{0x42}, 512*4)
	d2 := &memDisk{name: "same", rid: 1, data: same}
	tt2 := startTargetWith(t, 10*time.Second, map[string]*memDisk{"same": d2}, d2)
	ic2 := tt2.login(t, iscsitest.Options{TargetName: "same"})
	if res, err := ic2.Command(cdb10(opVerify10, 0x06, 0, 4), 512, same[:512]); err != nil || res.Status != statusGood {
		t.Fatalf("VERIFY BYTCHK 11: %v %+v", err, res)
	}
	// BYTCHK 0: the medium only.
	expectGood(t, ic, "VERIFY medium", cdb10(opVerify10, 0, 0, 100), 0)
	expectSense(t, ic, "VERIFY beyond the end", cdb16(opVerify16, uint64(len(disk)/512), 1), 0, senseIllegalRequest, ascLBAOutOfRange)
	expectSense(t, ic, "VRPROTECT", cdb10(opVerify10, 0x20, 0, 1), 0, senseIllegalRequest, ascInvalidFieldInCDB)
}
