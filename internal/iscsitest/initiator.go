// Package iscsitest is a small iSCSI initiator for tests: login with
// chosen keys, SCSI commands with Data-In and Data-Out (R2T), text
// requests with continuation, NOP-Out, task management and logout. It
// checks what it receives (sequence numbers, digests, Data-In order)
// strictly, so that tests see protocol mistakes of the target.
package iscsitest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Options configures a login.
type Options struct {
	InitiatorName string // default iqn.2025-01.test:initiator
	TargetName    string // "" for a discovery session
	// Keys replace or add operational keys ("Key=Value"); the defaults
	// offer digests None, ImmediateData=Yes, InitialR2T=No,
	// MaxRecvDataSegmentLength=262144.
	Keys []string
	// Raw keys are appended to the operational keys as they are.
	Raw          []string
	HeaderDigest bool // offer CRC32C,None for HeaderDigest
	DataDigest   bool // offer CRC32C,None for DataDigest
	ISID         [6]byte
	// SkipSecurity starts in the operational stage (CSG 1).
	SkipSecurity bool
	Timeout      time.Duration // every read and write (default 10 s)
}

// LoginError is a login response with a non-zero status.
type LoginError struct{ Class, Detail uint8 }

func (e *LoginError) Error() string {
	return fmt.Sprintf("login failed: status class %d detail %#02x", e.Class, e.Detail)
}

// Conn is a logged-in connection.
type Conn struct {
	c       net.Conn
	r       *bufio.Reader
	timeout time.Duration
	hd, dd  bool

	cmdSN     uint32
	expStatSN uint32
	itt       uint32
	// MaxCmdSN is the last MaxCmdSN the target sent.
	MaxCmdSN uint32
	// Keys are the target's answers during the login.
	Keys map[string]string
	// TSIH is the session handle the target assigned.
	TSIH uint16
	// TargetMaxRecv is the target's MaxRecvDataSegmentLength.
	TargetMaxRecv int
	// MaxBurst is the negotiated MaxBurstLength.
	MaxBurst int
	// Pings counts NOP-In pings from the target that were answered.
	Pings int
}

// PDU is a received PDU.
type PDU struct {
	BHS  [48]byte
	Data []byte
}

// Opcode returns the opcode.
func (p *PDU) Opcode() uint8 { return p.BHS[0] & 0x3f }

// U32 returns the big-endian word at off.
func (p *PDU) U32(off int) uint32 { return binary.BigEndian.Uint32(p.BHS[off:]) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Login runs a login on c.
func Login(c net.Conn, o Options) (*Conn, error) {
	if o.InitiatorName == "" {
		o.InitiatorName = "iqn.2025-01.test:initiator"
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	ic := &Conn{c: c, r: bufio.NewReader(c), timeout: o.Timeout, Keys: map[string]string{}, TargetMaxRecv: 8192, MaxBurst: 262144}
	ic.itt = 0x100
	sessionType := "Normal"
	if o.TargetName == "" {
		sessionType = "Discovery"
	}
	first := []string{"InitiatorName=" + o.InitiatorName, "SessionType=" + sessionType}
	if o.TargetName != "" {
		first = append(first, "TargetName="+o.TargetName)
	}
	hd, dd := "None", "None"
	if o.HeaderDigest {
		hd = "CRC32C,None"
	}
	if o.DataDigest {
		dd = "CRC32C,None"
	}
	ops := []string{"HeaderDigest=" + hd, "DataDigest=" + dd, "ImmediateData=Yes", "InitialR2T=No",
		"MaxRecvDataSegmentLength=262144", "MaxBurstLength=262144", "FirstBurstLength=65536",
		"MaxConnections=1", "ErrorRecoveryLevel=0", "DefaultTime2Wait=2", "DefaultTime2Retain=0",
		"MaxOutstandingR2T=1", "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes"}
	var rest []string
	for _, k := range o.Keys {
		name, _, _ := strings.Cut(k, "=")
		if i := slices.IndexFunc(first, func(f string) bool { return strings.HasPrefix(f, name+"=") }); i >= 0 {
			first[i] = k
		} else {
			rest = append(rest, k)
		}
	}
	ops = append(override(ops, rest), o.Raw...)
	var stages [][]string
	if o.SkipSecurity {
		stages = [][]string{append(first, ops...)}
	} else {
		stages = [][]string{append(first, "AuthMethod=None"), ops}
	}
	for i, keys := range stages {
		csg := byte(0)
		if o.SkipSecurity || i == 1 {
			csg = 1
		}
		nsg := byte(3)
		if !o.SkipSecurity && i == 0 {
			nsg = 1
		}
		h := ic.header(0x43, 0x80|csg<<2|nsg, ic.itt, 0)
		copy(h[8:14], o.ISID[:])
		if err := ic.Send(h, textOf(keys)); err != nil {
			return nil, err
		}
		p, err := ic.Recv()
		if err != nil {
			return nil, err
		}
		if p.Opcode() != 0x23 {
			return nil, fmt.Errorf("login: got opcode %#x", p.Opcode())
		}
		if p.BHS[36] != 0 {
			return nil, &LoginError{p.BHS[36], p.BHS[37]}
		}
		for k, v := range ParseText(p.Data) {
			ic.Keys[k] = v
		}
		if p.BHS[1]&0x80 == 0 {
			return nil, errors.New("login: the target did not move to the next stage")
		}
		ic.TSIH = binary.BigEndian.Uint16(p.BHS[14:])
	}
	ic.hd = ic.Keys["HeaderDigest"] == "CRC32C"
	ic.dd = ic.Keys["DataDigest"] == "CRC32C"
	if v, err := strconv.Atoi(ic.Keys["MaxRecvDataSegmentLength"]); err == nil {
		ic.TargetMaxRecv = v
	}
	if v, err := strconv.Atoi(ic.Keys["MaxBurstLength"]); err == nil {
		ic.MaxBurst = v
	}
	return ic, nil
}

// override replaces keys of list by the same keys in extra and appends the
// others.
func override(list, extra []string) []string {
	for _, e := range extra {
		k, _, _ := strings.Cut(e, "=")
		found := false
		for i, l := range list {
			if strings.HasPrefix(l, k+"=") {
				list[i], found = e, true
			}
		}
		if !found {
			list = append(list, e)
		}
	}
	return list
}

func textOf(keys []string) []byte {
	var b []byte
	for _, k := range keys {
		b = append(append(b, k...), 0)
	}
	return b
}

// ParseText splits a text segment into its keys (the last value of a key
// repeated wins; use ParseTextList for lists).
func ParseText(b []byte) map[string]string {
	m := map[string]string{}
	for _, kv := range ParseTextList(b) {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// ParseTextList splits a text segment into its key=value strings.
func ParseTextList(b []byte) []string {
	var out []string
	for _, s := range bytes.Split(b, []byte{0}) {
		if len(s) > 0 {
			out = append(out, string(s))
		}
	}
	return out
}

// Send writes a PDU: the BHS (its DataSegmentLength set here), digests
// as negotiated, the data padded.
func (ic *Conn) Send(h [48]byte, data []byte) error {
	n := len(data)
	h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n)
	b := append([]byte(nil), h[:]...)
	if ic.hd {
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(h[:], castagnoli))
	}
	if n > 0 {
		pad := make([]byte, (4-n%4)%4)
		b = append(append(b, data...), pad...)
		if ic.dd {
			b = binary.LittleEndian.AppendUint32(b, crc32.Update(crc32.Checksum(data, castagnoli), castagnoli, pad))
		}
	}
	ic.c.SetWriteDeadline(time.Now().Add(ic.timeout))
	_, err := ic.c.Write(b)
	return err
}

// SendRaw writes bytes as they are.
func (ic *Conn) SendRaw(b []byte) error {
	ic.c.SetWriteDeadline(time.Now().Add(ic.timeout))
	_, err := ic.c.Write(b)
	return err
}

// Recv reads the next PDU, checking digests and StatSN. NOP-In pings of
// the target are answered here and not returned.
func (ic *Conn) Recv() (*PDU, error) {
	for {
		p, err := ic.recv()
		if err != nil {
			return nil, err
		}
		if p.Opcode() == 0x20 && p.U32(16) == 0xffffffff {
			// A ping: answer with a NOP-Out carrying its TTT.
			h := ic.header(0x40, 0x80, 0xffffffff, p.U32(20))
			ic.Pings++
			if err := ic.Send(h, nil); err != nil {
				return nil, err
			}
			continue
		}
		return p, nil
	}
}

// recv reads one PDU.
func (ic *Conn) recv() (*PDU, error) {
	ic.c.SetReadDeadline(time.Now().Add(ic.timeout))
	p := &PDU{}
	if _, err := io.ReadFull(ic.r, p.BHS[:]); err != nil {
		return nil, err
	}
	if ahs := int(p.BHS[4]) * 4; ahs > 0 {
		return nil, fmt.Errorf("target sent %d bytes of AHS", ahs)
	}
	if ic.hd {
		var d [4]byte
		if _, err := io.ReadFull(ic.r, d[:]); err != nil {
			return nil, err
		}
		if binary.LittleEndian.Uint32(d[:]) != crc32.Checksum(p.BHS[:], castagnoli) {
			return nil, errors.New("header digest mismatch")
		}
	}
	n := int(p.BHS[5])<<16 | int(p.BHS[6])<<8 | int(p.BHS[7])
	if n > 0 {
		buf := make([]byte, n+(4-n%4)%4)
		if _, err := io.ReadFull(ic.r, buf); err != nil {
			return nil, err
		}
		if ic.dd {
			var d [4]byte
			if _, err := io.ReadFull(ic.r, d[:]); err != nil {
				return nil, err
			}
			if binary.LittleEndian.Uint32(d[:]) != crc32.Checksum(buf, castagnoli) {
				return nil, errors.New("data digest mismatch")
			}
		}
		p.Data = buf[:n]
	}
	op := p.Opcode()
	hasStatSN := op != 0x25 || p.BHS[1]&0x01 != 0 // Data-In only with status
	if op == 0x31 || op == 0x20 && p.U32(16) == 0xffffffff {
		hasStatSN = false // R2T and pings carry the next StatSN, not advanced
	}
	if hasStatSN {
		if sn := p.U32(24); sn != ic.expStatSN && op != 0x23 {
			return nil, fmt.Errorf("opcode %#x: StatSN %d, expected %d", op, sn, ic.expStatSN)
		}
		ic.expStatSN = p.U32(24) + 1
	}
	ic.MaxCmdSN = p.U32(32)
	return p, nil
}

// NextITT returns a new initiator task tag.
func (ic *Conn) NextITT() uint32 {
	ic.itt++
	return ic.itt
}

// CmdSN returns the CmdSN the next non-immediate request gets.
func (ic *Conn) CmdSN() uint32 { return ic.cmdSN }

// ExpStatSN returns the next StatSN expected.
func (ic *Conn) ExpStatSN() uint32 { return ic.expStatSN }

// Result is the outcome of a SCSI command.
type Result struct {
	Status   uint8
	Sense    []byte // sense data without its length prefix
	Data     []byte // Data-In, assembled
	Flags    uint8  // residual flags of the response (0x04 overflow, 0x02 underflow)
	Residual uint32
	DataPDUs int
	R2Ts     int
}

// SenseKey returns the sense key and ASC/ASCQ of fixed-format sense data.
func (r *Result) SenseKey() (key uint8, ascq uint16) {
	if len(r.Sense) < 14 {
		return 0, 0
	}
	return r.Sense[2] & 0x0f, binary.BigEndian.Uint16(r.Sense[12:])
}

// Command runs a SCSI command on LUN 0. out is the Data-Out buffer: as
// much as ImmediateData and FirstBurstLength allow goes with the command,
// the rest on R2Ts.
func (ic *Conn) Command(cdb []byte, edtl uint32, out []byte) (*Result, error) {
	return ic.CommandLUN(0, cdb, edtl, out)
}

// CommandLUN runs a SCSI command on a LUN.
func (ic *Conn) CommandLUN(lun uint16, cdb []byte, edtl uint32, out []byte) (*Result, error) {
	itt, err := ic.StartCommand(lun, cdb, edtl, out)
	if err != nil {
		return nil, err
	}
	return ic.Finish(itt, out)
}

// header returns a basic header segment with opcode op, the flags byte,
// the ITT, word 20 (TTT, expected length or referenced ITT, by opcode) and
// the session's CmdSN and ExpStatSN.
func (ic *Conn) header(op, flags byte, itt, word20 uint32) [48]byte {
	var h [48]byte
	h[0], h[1] = op, flags
	binary.BigEndian.PutUint32(h[16:], itt)
	binary.BigEndian.PutUint32(h[20:], word20)
	binary.BigEndian.PutUint32(h[24:], ic.cmdSN)
	binary.BigEndian.PutUint32(h[28:], ic.expStatSN)
	return h
}

// StartCommand sends a SCSI command (with immediate data) and returns
// its ITT; Finish collects the answer.
func (ic *Conn) StartCommand(lun uint16, cdb []byte, edtl uint32, out []byte) (uint32, error) {
	flags := byte(0x80 | 0x01) // final, simple task attribute
	if out != nil {
		flags |= 0x20
	} else if edtl > 0 {
		flags |= 0x40
	}
	itt := ic.NextITT()
	h := ic.header(0x01, flags, itt, edtl)
	ic.cmdSN++
	binary.BigEndian.PutUint16(h[8:], lun&0x3fff)
	copy(h[32:48], cdb)
	imm := out
	if ic.Keys["ImmediateData"] != "Yes" {
		imm = nil
	}
	first := 65536
	if v, err := strconv.Atoi(ic.Keys["FirstBurstLength"]); err == nil {
		first = v
	}
	if len(imm) > min(ic.TargetMaxRecv, first) {
		imm = imm[:min(ic.TargetMaxRecv, first)]
	}
	return itt, ic.Send(h, imm)
}

// Finish collects Data-In PDUs, answers R2Ts from out and returns the
// result of the command itt.
func (ic *Conn) Finish(itt uint32, out []byte) (*Result, error) {
	res := &Result{}
	var dataSN uint32
	for {
		p, err := ic.Recv()
		if err != nil {
			return nil, err
		}
		if p.U32(16) != itt {
			return nil, fmt.Errorf("opcode %#x for ITT %#x while waiting for %#x", p.Opcode(), p.U32(16), itt)
		}
		switch p.Opcode() {
		case 0x25: // Data-In
			if p.U32(36) != dataSN {
				return nil, fmt.Errorf("Data-In DataSN %d, expected %d", p.U32(36), dataSN)
			}
			if int(p.U32(40)) != len(res.Data) {
				return nil, fmt.Errorf("Data-In offset %d, expected %d", p.U32(40), len(res.Data))
			}
			dataSN++
			res.DataPDUs++
			res.Data = append(res.Data, p.Data...)
			if p.BHS[1]&0x01 != 0 {
				res.Status = p.BHS[3]
				res.Flags = p.BHS[1] & 0x06
				res.Residual = p.U32(44)
				return res, nil
			}
		case 0x31: // R2T
			res.R2Ts++
			if err := ic.dataOut(p, out); err != nil {
				return nil, err
			}
		case 0x21: // SCSI Response
			res.Status = p.BHS[3]
			res.Flags = p.BHS[1] & 0x06
			res.Residual = p.U32(44)
			if p.U32(36) != dataSN+uint32(res.R2Ts) {
				return nil, fmt.Errorf("ExpDataSN %d, sent %d Data-In and %d R2T", p.U32(36), dataSN, res.R2Ts)
			}
			if len(p.Data) >= 2 {
				n := int(binary.BigEndian.Uint16(p.Data))
				if n > len(p.Data)-2 {
					return nil, errors.New("sense length beyond the data segment")
				}
				res.Sense = p.Data[2 : 2+n]
			}
			return res, nil
		default:
			return nil, fmt.Errorf("unexpected opcode %#x", p.Opcode())
		}
	}
}

// dataOut answers an R2T with Data-Out PDUs of at most the target's
// MaxRecvDataSegmentLength.
func (ic *Conn) dataOut(r2t *PDU, out []byte) error {
	off, n := int(r2t.U32(40)), int(r2t.U32(44))
	if off+n > len(out) {
		return fmt.Errorf("R2T for %d bytes at %d, buffer has %d", n, off, len(out))
	}
	var dataSN uint32
	for sent := 0; sent < n; {
		k := min(n-sent, ic.TargetMaxRecv)
		var h [48]byte
		h[0] = 0x05
		if sent+k == n {
			h[1] = 0x80
		}
		copy(h[8:16], r2t.BHS[8:16])
		copy(h[16:24], r2t.BHS[16:24]) // ITT, TTT
		binary.BigEndian.PutUint32(h[28:], ic.expStatSN)
		binary.BigEndian.PutUint32(h[36:], dataSN)
		binary.BigEndian.PutUint32(h[40:], uint32(off+sent))
		if err := ic.Send(h, out[off+sent:off+sent+k]); err != nil {
			return err
		}
		dataSN++
		sent += k
	}
	return nil
}

// ReadBlocks reads n 512-byte blocks at lba with READ(16).
func (ic *Conn) ReadBlocks(lba uint64, n uint32) ([]byte, error) {
	cdb := make([]byte, 16)
	cdb[0] = 0x88
	binary.BigEndian.PutUint64(cdb[2:], lba)
	binary.BigEndian.PutUint32(cdb[10:], n)
	res, err := ic.Command(cdb, n*512, nil)
	if err != nil {
		return nil, err
	}
	if res.Status != 0 {
		key, ascq := res.SenseKey()
		return nil, fmt.Errorf("READ(16) status %#x sense %#x/%#04x", res.Status, key, ascq)
	}
	return res.Data, nil
}

// Capacity returns the number of blocks and the block size (READ
// CAPACITY(16)).
func (ic *Conn) Capacity() (blocks uint64, size uint32, err error) {
	cdb := []byte{0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}
	res, err := ic.Command(cdb, 32, nil)
	if err != nil {
		return 0, 0, err
	}
	if res.Status != 0 || len(res.Data) < 12 {
		return 0, 0, fmt.Errorf("READ CAPACITY(16) status %#x, %d bytes", res.Status, len(res.Data))
	}
	return binary.BigEndian.Uint64(res.Data) + 1, binary.BigEndian.Uint32(res.Data[8:]), nil
}

// Text sends a text request and returns the whole answer, following
// continuations.
func (ic *Conn) Text(keys ...string) ([]string, error) {
	itt := ic.NextITT()
	ttt := uint32(0xffffffff)
	data := textOf(keys)
	var answer []byte
	for {
		h := ic.header(0x04, 0x80, itt, ttt)
		ic.cmdSN++
		if err := ic.Send(h, data); err != nil {
			return nil, err
		}
		p, err := ic.Recv()
		if err != nil {
			return nil, err
		}
		if p.Opcode() != 0x24 || p.U32(16) != itt {
			return nil, fmt.Errorf("text: got opcode %#x ITT %#x", p.Opcode(), p.U32(16))
		}
		answer = append(answer, p.Data...)
		if p.BHS[1]&0x80 != 0 {
			return ParseTextList(answer), nil
		}
		if p.BHS[1]&0x40 == 0 {
			return nil, errors.New("text: neither final nor continued")
		}
		ttt, data = p.U32(20), nil
	}
}

// NOP sends a NOP-Out ping (immediate) and waits for its NOP-In.
func (ic *Conn) NOP(data []byte) ([]byte, error) {
	itt := ic.NextITT()
	h := ic.header(0x40, 0x80, itt, 0xffffffff)
	if err := ic.Send(h, data); err != nil {
		return nil, err
	}
	p, err := ic.Recv()
	if err != nil {
		return nil, err
	}
	if p.Opcode() != 0x20 || p.U32(16) != itt {
		return nil, fmt.Errorf("NOP: got opcode %#x ITT %#x", p.Opcode(), p.U32(16))
	}
	return p.Data, nil
}

// TMF sends a task management request (immediate) and returns the
// response code of the TMF response, reading past other PDUs (returned in
// others).
func (ic *Conn) TMF(function uint8, refITT, refCmdSN uint32) (resp uint8, others []*PDU, err error) {
	itt := ic.NextITT()
	h := ic.header(0x42, 0x80|function, itt, refITT)
	binary.BigEndian.PutUint32(h[32:], refCmdSN)
	if err := ic.Send(h, nil); err != nil {
		return 0, nil, err
	}
	for {
		p, err := ic.Recv()
		if err != nil {
			return 0, others, err
		}
		if p.Opcode() == 0x22 && p.U32(16) == itt {
			return p.BHS[2], others, nil
		}
		others = append(others, p)
	}
}

// Logout closes the session and waits for the response.
func (ic *Conn) Logout() error {
	itt := ic.NextITT()
	h := ic.header(0x46, 0x80, itt, 0)
	if err := ic.Send(h, nil); err != nil {
		return err
	}
	p, err := ic.Recv()
	if err != nil {
		return err
	}
	if p.Opcode() != 0x26 || p.BHS[2] != 0 {
		return fmt.Errorf("logout: opcode %#x response %d", p.Opcode(), p.BHS[2])
	}
	return nil
}

// Close closes the connection.
func (ic *Conn) Close() error { return ic.c.Close() }

// Raw returns the connection, for tests that write bytes themselves.
func (ic *Conn) Raw() net.Conn { return ic.c }

// Reader reads the connection's bytes, starting with what Recv has read
// ahead and not used yet (reading Raw directly would miss those).
func (ic *Conn) Reader() io.Reader { return ic.r }
