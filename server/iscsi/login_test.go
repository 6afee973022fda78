package iscsi

import (
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/iscsitest"
)

// The operational keys get RFC 7143's results against our side: minimum,
// OR and AND functions, the digests chosen from the offered lists, our
// MaxRecvDataSegmentLength declared, unknown keys NotUnderstood, and the
// portal group tag in the first response of a normal session.
func TestLoginNegotiation(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{
		HeaderDigest: true, DataDigest: true,
		Keys: []string{"MaxConnections=4", "ErrorRecoveryLevel=2", "InitialR2T=No", "ImmediateData=No",
			"MaxBurstLength=4194304", "FirstBurstLength=131072", "MaxOutstandingR2T=8",
			"DefaultTime2Retain=20", "DefaultTime2Wait=7", "IFMarker=Yes", "X-com.example.Foo=1", "Bogus=1"},
	})
	want := map[string]string{
		"AuthMethod": "None", "HeaderDigest": "CRC32C", "DataDigest": "CRC32C",
		"MaxConnections": "1", "ErrorRecoveryLevel": "0", "InitialR2T": "Yes", "ImmediateData": "No",
		"MaxBurstLength": "1048576", "FirstBurstLength": "65536", "MaxOutstandingR2T": "1",
		"DefaultTime2Retain": "0", "DefaultTime2Wait": "7", "IFMarker": "No",
		"X-com.example.Foo": "NotUnderstood", "Bogus": "NotUnderstood",
		"MaxRecvDataSegmentLength": "8192", "TargetPortalGroupTag": "1", "TargetAlias": "disk:3",
		"DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
	}
	for k, v := range want {
		if got := ic.Keys[k]; got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	if ic.TSIH == 0 {
		t.Error("TSIH 0 after the login")
	}
	// Digests are on now: a read checks both (the initiator verifies).
	data, err := ic.ReadBlocks(10, 600) // several Data-In PDUs
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(data, tt.disk.data[10*512:610*512]) {
		t.Fatal("data read with digests differs from the disk")
	}
	if err := ic.Logout(); err != nil {
		t.Fatal(err)
	}
}

// An initiator that skips the security stage and one that spreads its
// keys over several PDUs (C bit) both get in.
func TestLoginVariants(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	ic := tt.login(t, iscsitest.Options{SkipSecurity: true})
	if _, err := ic.ReadBlocks(0, 1); err != nil {
		t.Fatal(err)
	}

	// Continued text: the key list in two PDUs, split inside a key.
	c := tt.dial(t)
	text := "InitiatorName=iqn.2025-01.test:cont\x00SessionType=Normal\x00TargetName=disk\x00AuthMethod=None\x00"
	loginPDU := func(flags byte, data string) []byte {
		var h [48]byte
		h[0], h[1] = 0x43, flags
		binary.BigEndian.PutUint32(h[16:], 7)
		h[5], h[6], h[7] = byte(len(data)>>16), byte(len(data)>>8), byte(len(data))
		b := append(h[:], data...)
		return append(b, make([]byte, (4-len(data)%4)%4)...)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(loginPDU(0x40|0x01, text[:20])); err != nil { // C, CSG 0, NSG 1
		t.Fatal(err)
	}
	resp := make([]byte, 48)
	if _, err := readFull(c, resp); err != nil {
		t.Fatal(err)
	}
	if resp[0] != 0x23 || resp[36] != 0 || resp[1]&0x80 != 0 || dataLen(resp) != 0 {
		t.Fatalf("response to a continued login PDU: % x", resp[:8])
	}
	if _, err := c.Write(loginPDU(0x80|0x03, text[20:])); err != nil { // T, CSG 0, NSG 3
		t.Fatal(err)
	}
	if _, err := readFull(c, resp); err != nil {
		t.Fatal(err)
	}
	if resp[0] != 0x23 || resp[36] != 0 || resp[1] != 0x83 || binary.BigEndian.Uint16(resp[14:]) == 0 {
		t.Fatalf("final login response: % x", resp[:48])
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func dataLen(h []byte) int { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }

// Logins that cannot succeed get the status RFC 7143 defines, not a
// silent close.
func TestLoginFailures(t *testing.T) {
	tt := startTarget(t, 10*time.Second)
	cases := []struct {
		name          string
		o             iscsitest.Options
		class, detail uint8
	}{
		{"unknown target", iscsitest.Options{TargetName: "nosuch"}, 2, 0x03},
		{"CHAP only", iscsitest.Options{Keys: []string{"AuthMethod=CHAP"}, SkipSecurity: true}, 2, 0x01},
		{"bad session type", iscsitest.Options{Keys: []string{"SessionType=Weird"}, SkipSecurity: true}, 2, 0x09},
		{"key twice", iscsitest.Options{Raw: []string{"X-dup=1", "X-dup=2"}, SkipSecurity: true}, 2, 0x00},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.o.TargetName == "" {
				c.o.TargetName = "disk"
			}
			_, err := iscsitest.Login(tt.dial(t), c.o)
			var le *iscsitest.LoginError
			if !errors.As(err, &le) || le.Class != c.class || le.Detail != c.detail {
				t.Fatalf("got %v, want status %d/%#02x", err, c.class, c.detail)
			}
		})
	}

	// Raw first PDUs: no InitiatorName, a TSIH of a session that does not
	// exist, an iSCSI version above 0.
	raw := []struct {
		name          string
		mod           func(h []byte)
		text          string
		class, detail uint8
	}{
		{"no initiator name", nil, "SessionType=Normal\x00TargetName=disk\x00", 2, 0x07},
		{"no target name", nil, "InitiatorName=iqn.x:y\x00SessionType=Normal\x00", 2, 0x07},
		{"unknown TSIH", func(h []byte) { h[15] = 9 }, "InitiatorName=iqn.x:y\x00TargetName=disk\x00", 2, 0x0a},
		{"version", func(h []byte) { h[3] = 2 }, "InitiatorName=iqn.x:y\x00TargetName=disk\x00", 2, 0x05},
		{"bad stage", func(h []byte) { h[1] = 0x80 | 2<<2 | 3 }, "InitiatorName=iqn.x:y\x00TargetName=disk\x00", 2, 0x0b},
		{"no key=value", nil, "InitiatorName\x00", 2, 0x00},
	}
	for _, c := range raw {
		t.Run(c.name, func(t *testing.T) {
			conn := tt.dial(t)
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			h := make([]byte, 48)
			h[0], h[1] = 0x43, 0x81
			if c.mod != nil {
				c.mod(h)
			}
			h[7] = byte(len(c.text))
			b := append(h, c.text...)
			b = append(b, make([]byte, (4-len(c.text)%4)%4)...)
			if _, err := conn.Write(b); err != nil {
				t.Fatal(err)
			}
			resp := make([]byte, 48)
			if _, err := readFull(conn, resp); err != nil {
				t.Fatal(err)
			}
			if resp[36] != c.class || resp[37] != c.detail {
				t.Fatalf("status %d/%#02x, want %d/%#02x", resp[36], resp[37], c.class, c.detail)
			}
			// The target closes the connection after a failed login.
			if _, err := readFull(conn, resp[:1]); err == nil {
				t.Fatal("connection still open after a failed login")
			}
		})
	}
}

// A login that does not finish within the client timeout is dropped.
func TestLoginTimeout(t *testing.T) {
	tt := startTarget(t, 300*time.Millisecond)
	c := tt.dial(t)
	c.Write([]byte{0x43, 0x81}) // half a header, then silence
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	var ne net.Error
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the target answered half a PDU")
	} else if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the target kept the connection open for 10 s: %v", err)
	}
	t.Logf("closed after %v", time.Since(start).Round(time.Millisecond))
}

// A discovery session lists every target with this connection's address
// (long lists in several PDUs); SendTargets=All in a normal session is
// refused, an empty SendTargets describes the session's target.
func TestSendTargets(t *testing.T) {
	disks := map[string]*memDisk{}
	for i := range 300 {
		name := "iqn.2025-01.com.example:image-with-a-long-name-" + strings.Repeat("x", 20) + ":" + strconv.Itoa(i)
		disks[name] = &memDisk{name: "d", rid: 1, data: make([]byte, 4096)}
	}
	tt := startTargetWith(t, 10*time.Second, disks, nil)
	c := tt.dial(t)
	ic, err := iscsitest.Login(c, iscsitest.Options{Keys: []string{"MaxRecvDataSegmentLength=1024"}})
	if err != nil {
		t.Fatal(err)
	}
	list, err := ic.Text("SendTargets=All")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	wantAddr := "TargetAddress=" + c.RemoteAddr().String() + ",1"
	for i, kv := range list {
		if k, v, _ := strings.Cut(kv, "="); k == "TargetName" {
			names[v] = true
			if i+1 >= len(list) || list[i+1] != wantAddr {
				t.Fatalf("target %s without %s", v, wantAddr)
			}
		}
	}
	if len(names) != len(disks) {
		t.Fatalf("discovery listed %d targets, want %d", len(names), len(disks))
	}
	for n := range disks {
		if !names[n] {
			t.Fatalf("target %s missing", n)
		}
	}
	if err := ic.Logout(); err != nil {
		t.Fatal(err)
	}

	one := "iqn.2025-01.com.example:image-with-a-long-name-xxxxxxxxxxxxxxxxxxxx:7"
	ic = tt.login(t, iscsitest.Options{TargetName: one})
	if list, err := ic.Text("SendTargets=All"); err != nil || !slices.Equal(list, []string{"SendTargets=Reject"}) {
		t.Fatalf("SendTargets=All in a normal session: %q, %v", list, err)
	}
	if list, err := ic.Text("SendTargets="); err != nil || len(list) != 2 || list[0] != "TargetName="+one {
		t.Fatalf("SendTargets= in a normal session: %q, %v", list, err)
	}
	if list, err := ic.Text("MaxBurstLength=512", "X-foo=bar"); err != nil || !slices.Equal(list, []string{"MaxBurstLength=Reject", "X-foo=NotUnderstood"}) {
		t.Fatalf("renegotiation: %q, %v", list, err)
	}
}
