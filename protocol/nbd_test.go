package protocol

import (
	"bytes"
	"encoding/hex"
	"testing"
)

// TestNBDWire pins the byte layout the Linux nbd driver sends and expects.
func TestNBDWire(t *testing.T) {
	var b [NBDRequestSize]byte
	(&NBDRequest{Flags: 1, Type: NBDCmdRead, Cookie: 0x0102030405060708, Offset: 0x1000, Length: 0x20000}).MarshalTo(b[:])
	if got := hex.EncodeToString(b[:]); got != "25609513"+"0001"+"0000"+"0102030405060708"+"0000000000001000"+"00020000" {
		t.Fatalf("request %s", got)
	}
	r, err := ParseNBDRequest(b[:])
	if err != nil || r != (NBDRequest{Flags: 1, Type: NBDCmdRead, Cookie: 0x0102030405060708, Offset: 0x1000, Length: 0x20000}) {
		t.Fatalf("parse %+v %v", r, err)
	}
	b[0] = 0
	if _, err := ParseNBDRequest(b[:]); err != ErrNBDMagic {
		t.Fatalf("bad magic: %v", err)
	}
	if _, err := ParseNBDRequest(b[:10]); err != ErrShort {
		t.Fatalf("short: %v", err)
	}
	var rep [NBDReplySize]byte
	PutNBDReply(rep[:], NBDEIO, 0xAABB)
	if got := hex.EncodeToString(rep[:]); got != "67446698"+"00000005"+"000000000000aabb" {
		t.Fatalf("reply %s", got)
	}
	if e, c, err := ParseNBDReply(rep[:]); e != NBDEIO || c != 0xAABB || err != nil {
		t.Fatalf("parse reply %d %x %v", e, c, err)
	}
}

// TestSelectReplyFeatures: the feature mask is only on the wire when set,
// and a reply without it (every reference server's) reads as 0.
func TestSelectReplyFeatures(t *testing.T) {
	plain := SelectImageReply{Version: 3, Name: "test", RID: 1, Size: 256 << 20}
	if got := hex.EncodeToString(plain.Marshal()); got != "0300746573740001000000001000000000" { // spec §5.3, observed
		t.Fatalf("reply without features changed: %s", got)
	}
	ext := plain
	ext.Features = FeatureNBD
	enc := ext.Marshal()
	if !bytes.Equal(enc[:len(enc)-4], plain.Marshal()) || !bytes.Equal(enc[len(enc)-4:], []byte{1, 0, 0, 0}) {
		t.Fatalf("extended reply %x", enc)
	}
	for _, c := range []struct {
		p    []byte
		want uint32
	}{{enc, FeatureNBD}, {plain.Marshal(), 0}, {enc[:len(enc)-1], 0}} {
		got, err := ParseSelectImageReply(c.p)
		if err != nil || got.Features != c.want || got.Size != plain.Size {
			t.Fatalf("parse %x: %+v %v", c.p, got, err)
		}
	}
	if CmdNBDMode.String() != "NBD_MODE" || FlagFeatures&(FlagServer|FlagBgRep) != 0 {
		t.Fatal("constants")
	}
}
