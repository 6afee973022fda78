package iscsi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/iscsitest"
)

// gatedTarget serves a disk whose reads wait for the gate: commands queue
// up behind a running one.
func gatedTarget(t *testing.T) (*testTarget, chan struct{}) {
	gate := make(chan struct{})
	d := &memDisk{name: "disk", rid: 1, data: pattern(1 << 20), gate: gate}
	return startTargetWith(t, 10*time.Second, map[string]*memDisk{"disk": d}, d), gate
}

// ABORT TASK of a queued command: the command never answers, the TMF
// response follows the response of the command before it. Aborting a task
// that completed says "task does not exist".
func TestAbortTask(t *testing.T) {
	tt, gate := gatedTarget(t)
	ic := tt.login(t, iscsitest.Options{})
	a, err := ic.StartCommand(0, cdb10(opRead10, 0, 0, 8), 4096, nil)
	if err != nil {
		t.Fatal(err)
	}
	bSN := ic.CmdSN()
	b, err := ic.StartCommand(0, cdb10(opRead10, 0, 8, 8), 4096, nil)
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(200*time.Millisecond, func() { close(gate) })
	resp, others, err := ic.TMF(tmfAbortTask, b, bSN)
	if err != nil {
		t.Fatal(err)
	}
	if resp != tmfComplete {
		t.Fatalf("ABORT TASK of a queued command: response %d", resp)
	}
	// Before the TMF response: command A's data and status, nothing of B.
	var gotA bool
	for _, p := range others {
		switch p.U32(16) {
		case a:
			gotA = gotA || p.BHS[1]&0x01 != 0
		case b:
			t.Fatalf("a PDU (opcode %#x) for the aborted command", p.Opcode())
		}
	}
	if !gotA {
		t.Fatal("the status of the command before the TMF did not come before the TMF response")
	}
	resp, _, err = ic.TMF(tmfAbortTask, a, bSN-1)
	if err != nil || resp != tmfNoTask {
		t.Fatalf("ABORT TASK of a completed command: %d, %v", resp, err)
	}
	// The session goes on.
	if data, err := ic.ReadBlocks(0, 1); err != nil || !bytes.Equal(data, tt.disk.data[:512]) {
		t.Fatalf("read after the aborts: %v", err)
	}
}

// LUN RESET aborts the running command (its wait ends) and the queued
// ones, and clears PREVENT.
func TestLUNReset(t *testing.T) {
	tt, gate := gatedTarget(t)
	defer close(gate)
	ic := tt.login(t, iscsitest.Options{})
	if r, err := ic.Command([]byte{opPreventAllow, 0, 0, 0, 1, 0}, 0, nil); err != nil || r.Status != 0 {
		t.Fatal("PREVENT", err)
	}
	for i := range 3 {
		if _, err := ic.StartCommand(0, cdb10(opRead10, 0, uint32(i), 1), 512, nil); err != nil {
			t.Fatal(err)
		}
	}
	resp, others, err := ic.TMF(tmfLUNReset, 0, 0)
	if err != nil || resp != tmfComplete {
		t.Fatalf("LUN RESET: %d, %v", resp, err)
	}
	if len(others) != 0 {
		t.Fatalf("%d PDUs of aborted commands", len(others))
	}
	// PREVENT is gone: an eject is allowed again.
	if r, err := ic.Command([]byte{opStartStopUnit, 0, 0, 0, 2, 0}, 0, nil); err != nil || r.Status != 0 {
		t.Fatalf("START STOP UNIT after the reset: %v %+v", err, r)
	}
	for _, fn := range []uint8{tmfAbortTaskSet, tmfClearTaskSet, tmfClearACA, tmfTargetWarm} {
		if resp, _, err := ic.TMF(fn, 0, 0); err != nil || resp != tmfComplete {
			t.Fatalf("function %d: %d, %v", fn, resp, err)
		}
	}
	if resp, _, err := ic.TMF(tmfTaskReassign, 0, 0); err != nil || resp != tmfNoReassign {
		t.Fatalf("TASK REASSIGN: %d, %v", resp, err)
	}
	if resp, _, err := ic.TMF(99, 0, 0); err != nil || resp != tmfNotSupported {
		t.Fatalf("function 99: %d, %v", resp, err)
	}
	// TARGET COLD RESET answers, then drops the connection.
	if resp, _, err := ic.TMF(tmfTargetCold, 0, 0); err != nil || resp != tmfComplete {
		t.Fatalf("TARGET COLD RESET: %d, %v", resp, err)
	}
	if _, err := ic.Recv(); err == nil {
		t.Fatal("the connection stayed open after a cold reset")
	}
}

// Commands outside the CmdSN window are ignored (RFC 7143 section
// 4.2.2.1); one ahead of the window's start waits for the gap.
func TestCmdSNWindow(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{})
	tur := func(cmdSN uint32, itt uint32) {
		var h [48]byte
		h[0], h[1] = 0x01, 0x81
		binary.BigEndian.PutUint32(h[16:], itt)
		binary.BigEndian.PutUint32(h[24:], cmdSN)
		binary.BigEndian.PutUint32(h[28:], ic.ExpStatSN())
		if err := ic.Send(h, nil); err != nil {
			t.Fatal(err)
		}
	}
	exp := ic.CmdSN()
	tur(exp-1, 0x9001)         // too low
	tur(ic.MaxCmdSN+1, 0x9002) // too high
	tur(exp+1, 0x9003)         // ahead: held
	tur(exp, 0x9004)           // fills the gap: both run, in order
	p1, err := ic.Recv()
	if err != nil {
		t.Fatal(err)
	}
	p2, err := ic.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if p1.U32(16) != 0x9004 || p2.U32(16) != 0x9003 || p2.U32(28) != exp+2 {
		t.Fatalf("responses for ITT %#x, %#x (ExpCmdSN %d), want 0x9004, 0x9003 (%d)", p1.U32(16), p2.U32(16), p2.U32(28), exp+2)
	}
	if got := p2.U32(32) - p2.U32(28) + 1; got != cmdWindow {
		t.Fatalf("window %d, want %d", got, cmdWindow)
	}
	// NOP-Out echoes its data.
	if data, err := ic.NOP([]byte("ping data")); err != nil || string(data) != "ping data" {
		t.Fatalf("NOP: %q %v", data, err)
	}
}

// A silent initiator gets NOP-In pings and is dropped after 4 timeouts
// without a PDU; one that answers the pings stays.
func TestIdleTimeout(t *testing.T) {
	tt := startTarget(t, 200*time.Millisecond)
	ic := tt.login(t, iscsitest.Options{Timeout: 5 * time.Second})
	// Answering: Recv answers pings and waits for the next real PDU.
	start := time.Now()
	for time.Since(start) < 1200*time.Millisecond {
		if _, err := ic.NOP(nil); err != nil {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond)
	}
	// Silent: read raw PDUs without answering.
	raw := ic.Raw()
	raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	pings := 0
	for {
		var h [48]byte
		if _, err := io.ReadFull(ic.Reader(), h[:]); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the target kept a silent initiator for 10 s")
			}
			break
		}
		if h[0]&0x3f == 0x20 && binary.BigEndian.Uint32(h[20:]) != 0xffffffff {
			pings++
		}
	}
	if pings != 3 {
		t.Fatalf("%d pings before the drop, want 3", pings)
	}
}

// Hostile input ends the connection, never the target: an over-long data
// segment, a login PDU in the full feature phase, bad Data-Out sequences.
func TestHostileInput(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	cases := map[string][]byte{
		"data segment too long": func() []byte {
			var h [48]byte
			h[0], h[1] = 0x41, 0x80
			h[5], h[6], h[7] = 0xff, 0xff, 0xff
			return h[:]
		}(),
		"garbage": bytes.Repeat([]byte{0xff}, 200),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			ic := tt.login(t, iscsitest.Options{})
			if err := ic.SendRaw(b); err != nil {
				t.Fatal(err)
			}
			expectClosed(t, ic)
		})
	}
	// Data-Out for a VERIFY with a wrong TTT.
	ic := tt.login(t, iscsitest.Options{Keys: []string{"ImmediateData=No"}})
	itt, err := ic.StartCommand(0, cdb10(opVerify10, 0x02, 0, 1), 512, make([]byte, 512))
	if err != nil {
		t.Fatal(err)
	}
	p, err := ic.Recv()
	if err != nil || p.Opcode() != 0x31 {
		t.Fatalf("no R2T: %v", err)
	}
	var h [48]byte
	h[0], h[1] = 0x05, 0x80
	binary.BigEndian.PutUint32(h[16:], itt)
	binary.BigEndian.PutUint32(h[20:], p.U32(20)+1)
	if err := ic.Send(h, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, ic)
	// The target still serves others.
	ic = tt.login(t, iscsitest.Options{})
	if _, err := ic.ReadBlocks(0, 8); err != nil {
		t.Fatal(err)
	}
}

// expectClosed reads until the target closes the connection.
func expectClosed(t *testing.T, ic *iscsitest.Conn) {
	t.Helper()
	for {
		_, err := ic.Recv()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the connection is still open")
		}
		if err != nil {
			return
		}
	}
}

// The session list has the initiator's name while it is logged in; the
// disk is released at the end. A new login with the same ISID replaces
// an old session (reinstatement).
func TestSessionsList(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{InitiatorName: "iqn.2025-01.test:one", ISID: [6]byte{1, 2, 3, 4, 5, 6}})
	list := tt.Sessions()
	if len(list) != 1 || list[0].Initiator != "iqn.2025-01.test:one" || list[0].Disk == nil {
		t.Fatalf("sessions %+v", list)
	}
	if _, err := ic.ReadBlocks(0, 16); err != nil {
		t.Fatal(err)
	}
	if tt.Sessions()[0].BytesSent != 16*512 {
		t.Fatalf("bytes sent %d", tt.Sessions()[0].BytesSent)
	}
	ic2 := tt.login(t, iscsitest.Options{InitiatorName: "iqn.2025-01.test:one", ISID: [6]byte{1, 2, 3, 4, 5, 6}})
	if _, err := ic.Recv(); err == nil {
		t.Fatal("the old session survived the reinstatement")
	}
	if err := ic2.Logout(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(tt.Sessions()) > 0 || tt.disk.closedCount() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions, disk closed %d times after both ended", len(tt.Sessions()), tt.disk.closedCount())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (d *memDisk) closedCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closed
}
