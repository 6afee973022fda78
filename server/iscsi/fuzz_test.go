package iscsi

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// FuzzReadPDU: any byte stream gives PDUs within the limits or an error,
// never a panic or a data segment above MaxRecvDataSegmentLength.
func FuzzReadPDU(f *testing.F) {
	var h BHS
	h[0], h[1] = byte(OpNOPOut)|immediateBit, flagFinal
	f.Add(appendPDU(nil, &h, []byte("ping"), false, false), false, false)
	f.Add(appendPDU(nil, &h, []byte("digest"), true, true), true, true)
	h[4] = 1
	f.Add(append(appendPDU(nil, &h, nil, false, false), 1, 2, 3, 4), false, false)
	f.Fuzz(func(t *testing.T, b []byte, hd, dd bool) {
		pr := pduReader{r: bufio.NewReader(bytes.NewReader(b)), maxData: ourMaxRecvDataSegment, headerDigest: hd, dataDigest: dd}
		for {
			p, err := pr.read()
			if err != nil {
				return
			}
			if len(p.Data) > ourMaxRecvDataSegment || len(p.AHS) > maxAHSLen {
				t.Fatalf("PDU with %d data and %d AHS bytes", len(p.Data), len(p.AHS))
			}
		}
	})
}

// FuzzText: text segments parse or fail cleanly; negotiating any keys
// gives an answer or a login error; a parsed list encodes back to itself.
func FuzzText(f *testing.F) {
	f.Add([]byte("InitiatorName=iqn.x:y\x00MaxBurstLength=0x1000\x00HeaderDigest=CRC32C,None\x00"))
	f.Add([]byte("AuthMethod=CHAP\x00"))
	f.Add([]byte("=x\x00\x00\x00a=b"))
	f.Fuzz(func(t *testing.T, b []byte) {
		kvs, err := parseText(b)
		if err != nil {
			return
		}
		var enc []byte
		for _, x := range kvs {
			enc = appendKV(enc, x.key, x.value)
		}
		again, err := parseText(enc)
		if err != nil || len(again) != len(kvs) {
			t.Fatalf("round trip: %v, %d pairs instead of %d", err, len(again), len(kvs))
		}
		p := defaultParams()
		out, err := p.negotiate(kvs)
		if err == nil {
			if _, err := parseText(out); err != nil {
				t.Fatalf("our answer does not parse: %q", out)
			}
		}
		p.finish()
		if p.firstBurst > p.maxBurst || p.maxSendData < 512 {
			t.Fatalf("inconsistent parameters %+v", p)
		}
	})
}

// FuzzTargetName: every reading of a target name is usable.
func FuzzTargetName(f *testing.F) {
	for _, s := range []string{"iqn.2024-01.org.example:ubuntu:7", "ubuntu", "wwn-0x2000000347f0e016:3", ":::", "a:0:65536"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, r := range ParseTargetName(s) {
			if !r.ByWWN && r.Name == "" {
				t.Fatalf("%q: empty name", s)
			}
		}
	})
}

// discardConn is a net.Conn that takes every write.
type discardConn struct{ net.Conn }

func (discardConn) Write(b []byte) (int, error)       { return len(b), nil }
func (discardConn) SetWriteDeadline(time.Time) error  { return nil }
func (discardConn) SetDeadline(time.Time) error       { return nil }
func (discardConn) Close() error                      { return nil }
func (discardConn) RemoteAddr() net.Addr              { return &net.TCPAddr{} }
func (discardConn) LocalAddr() net.Addr               { return &net.TCPAddr{} }
func (discardConn) SetReadDeadline(t time.Time) error { return nil }
func (discardConn) Read(b []byte) (int, error)        { return 0, io.EOF }

// FuzzSCSI: any CDB, LUN and expected length gives a status with sense
// data or data within the limits, never a panic.
func FuzzSCSI(f *testing.F) {
	f.Add(cdb16(opRead16, 3, 5), uint32(4096), false)
	f.Add([]byte{opInquiry, 1, 0x83, 0, 255, 0}, uint32(255), false)
	f.Add([]byte{opMaintenanceIn, saReportOpcodes, 0x82, opServiceActionIn, 0, 0x10, 0, 0, 1, 0, 0, 0}, uint32(256), true)
	f.Add([]byte{opModeSense10, 0x10, 0x3f, 0xff, 0, 0, 0, 0, 255, 0}, uint32(255), false)
	data := pattern(1 << 20)
	tg := New(Config{Backend: &memBackend{}, Logger: slog.New(slog.DiscardHandler)})
	f.Fuzz(func(t *testing.T, cdb []byte, edtl uint32, lun bool) {
		d := &memDisk{name: "d", rid: 1, data: data}
		s := newSession(tg, discardConn{}, bufio.NewReader(bytes.NewReader(nil)))
		s.disk = d
		defer s.cancel()
		var h BHS
		h[0], h[1] = byte(OpSCSICmd), flagFinal|flagRead
		h.SetU32(20, edtl)
		copy(h[32:], cdb)
		if lun {
			h[9] = 1
		}
		p := &PDU{BHS: h}
		task := &task{pdu: p, itt: 1, ctx: context.Background(), cancel: func() {}}
		c := &scsiCmd{t: task, cdb: p.BHS[32:48], lun: p.LUN(), edtl: int64(edtl)}
		res := s.execCDB(c)
		switch res.status {
		case statusGood, statusConditionMet:
			if res.src != nil {
				n := min(res.length, c.edtl)
				buf := make([]byte, n)
				if _, err := res.src.ReadAt(buf, 0); err != nil {
					t.Fatal(err)
				}
			}
		case statusCheckCondition:
			if sd := res.sense.fixed(); len(sd) != 18 || sd[2] == 0 {
				t.Fatalf("sense % x", sd)
			}
		default:
			if !res.abort && res.err == nil {
				t.Fatalf("status %#x", res.status)
			}
		}
		if err := s.respond(c, res); err != nil {
			t.Fatal(err)
		}
	})
}

// loginBytes is a valid single-PDU login to target "disk".
func loginBytes() []byte {
	var h BHS
	h[0], h[1] = byte(OpLoginReq)|immediateBit, flagTransit|stageSecurity<<2|stageFullFeature
	text := []byte("InitiatorName=iqn.2025-01.test:fuzz\x00TargetName=disk\x00AuthMethod=None\x00")
	return appendPDU(nil, &h, text, false, false)
}

// FuzzSession: after a valid login, any byte stream from the initiator
// ends in a closed session, never a panic or a hang.
func FuzzSession(f *testing.F) {
	var h BHS
	h[0], h[1] = byte(OpSCSICmd), flagFinal|flagRead
	h.SetU32(20, 4096)
	copy(h[32:], cdb10(opRead10, 0, 0, 8))
	f.Add(appendPDU(nil, &h, nil, false, false))
	h = BHS{}
	h[0], h[1] = byte(OpTextReq), flagFinal
	h.SetU32(20, reserved)
	f.Add(appendPDU(nil, &h, []byte("SendTargets=\x00"), false, false))
	h = BHS{}
	h[0], h[1] = byte(OpTMFReq)|immediateBit, flagFinal|tmfLUNReset
	f.Add(appendPDU(nil, &h, nil, false, false))
	h = BHS{}
	h[0], h[1] = byte(OpSCSICmd), flagFinal|flagWrite
	h.SetU32(20, 512)
	copy(h[32:], cdb10(opVerify10, 0x02, 0, 1))
	out := appendPDU(nil, &h, nil, false, false)
	var do BHS
	do[0], do[1] = byte(OpDataOut), flagFinal
	do.SetU32(20, 1)
	f.Add(appendPDU(out, &do, make([]byte, 512), false, false))
	f.Fuzz(func(t *testing.T, b []byte) {
		d := &memDisk{name: "disk", rid: 1, data: pattern(64 << 10)}
		tg := New(Config{Backend: &memBackend{disks: map[string]*memDisk{"disk": d}}, Logger: slog.New(slog.DiscardHandler),
			Timeout: func() time.Duration { return time.Second }})
		srv, cli := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			tg.Serve(context.Background(), srv, bufio.NewReader(srv))
			srv.Close()
		}()
		go io.Copy(io.Discard, cli)
		cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
		cli.Write(loginBytes())
		cli.Write(b)
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the session did not end within 10 s of the initiator closing")
		}
		if len(tg.Sessions()) != 0 {
			t.Fatal("session still listed")
		}
		if d.closedCount() != 1 {
			t.Fatalf("disk closed %d times", d.closedCount())
		}
	})
}
