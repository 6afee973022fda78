package protocol

import (
	"bytes"
	"strings"
	"testing"
)

func TestRequestOffsetIs56Bits(t *testing.T) {
	r := Request{Cmd: CmdGetBlock, Size: 4096, Offset: 1<<60 | 12345, Hops: 0x81, Handle: 7}
	b := r.Marshal()
	if b[15] != 0x81 {
		t.Fatalf("hops byte = %#x", b[15])
	}
	got, err := ParseRequest(b[:])
	if err != nil {
		t.Fatal(err)
	}
	if got.Offset != 12345 || got.Hops != 0x81 || got.Handle != 7 || got.Size != 4096 {
		t.Fatalf("got %+v", got)
	}
	if HopCount(0x81) != 1 || HopCount(0x7f) != 63 {
		t.Fatal("HopCount")
	}
}

func TestHeaderErrors(t *testing.T) {
	if _, err := ParseRequest(make([]byte, 23)); err != ErrShort {
		t.Errorf("short: %v", err)
	}
	if _, err := ParseRequest(make([]byte, 24)); err != ErrBadMagic {
		t.Errorf("magic: %v", err)
	}
	if _, err := ParseReply([]byte("GET /query?q=stats HTTP")); err != ErrBadMagic {
		t.Errorf("magic: %v", err)
	}
}

func TestSerializerReadPastEnd(t *testing.T) {
	// payload without flags byte, and without rid+flags: accepted, read as 0
	for _, p := range [][]byte{{3, 0, 'a', 0, 5, 0}, {3, 0, 'a', 0}, {3, 0, 'a', 0, 5}} {
		s, err := ParseSelectImage(p)
		if err != nil || s.Name != "a" || s.Flags != 0 {
			t.Errorf("%x: %+v %v", p, s, err)
		}
	}
	s, _ := ParseSelectImage([]byte{3, 0, 'a', 0, 5, 0, 3, 9, 9, 9})
	if s.RID != 5 || s.Flags != 3 {
		t.Errorf("extra bytes: %+v", s)
	}
	if _, err := ParseSelectImage([]byte{3, 0}); err != ErrSelectTooShort {
		t.Errorf("short: %v", err)
	}
	if _, err := ParseSelectImage([]byte{3, 0, 'a', 'b'}); err != ErrSelectNoName {
		t.Errorf("no NUL: %v", err)
	}
	r := NewReader([]byte{1})
	if r.U16() != 0 || r.U8() != 0 || r.U64() != 0 {
		t.Error("past end must read 0")
	}
	if _, ok := r.String(); ok {
		t.Error("past end string must fail")
	}
	// writes that do not fit are dropped
	var w Writer
	w.PutString(strings.Repeat("x", 998))
	w.PutU16(7)
	if len(w.Bytes()) != 999 {
		t.Errorf("len = %d", len(w.Bytes()))
	}
	w.PutU8(1)
	w.PutU8(1)
	if len(w.Bytes()) != 1000 {
		t.Errorf("len = %d", len(w.Bytes()))
	}
}

func TestValidImageName(t *testing.T) {
	good := []string{"test", "sub/dir/odd.img", "ubuntu/base.qcow2", "a.b/c", "ONDEMAND", "x/y..z"}
	bad := []string{"", "../x", "/abs", "a/.b", ".hidden", "./test", "test/", "a/../b", "a\x00b", strings.Repeat("n", MaxNameLength+1),
		// aliases of "sub/dir/odd.img" that name the same file
		"sub//dir/odd.img", "sub/dir//odd.img", "sub///dir/odd.img", "sub/./dir/odd.img", "sub/dir/./odd.img", "sub/x/../dir/odd.img", "sub/dir/odd.img/"}
	for _, n := range good {
		if !ValidImageName(n) {
			t.Errorf("%q refused", n)
		}
	}
	for _, n := range bad {
		if ValidImageName(n) {
			t.Errorf("%q accepted", n)
		}
	}
}

func TestCRCPaddingAndBlocks(t *testing.T) {
	// A 10001-byte file: one hash block over 12288 bytes (zero padded).
	data := bytes.Repeat([]byte{7}, 10001)
	list, err := ComputeCRCList(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	padded := append(bytes.Clone(data), make([]byte, 12288-10001)...)
	if len(list) != 1 || list[0] != CRC32(padded) {
		t.Fatalf("list %x, want %x", list, CRC32(padded))
	}
	if HashBlockCount(HashBlockSize) != 1 || HashBlockCount(HashBlockSize+4096) != 2 || HashBlockCount(0) != 0 {
		t.Error("HashBlockCount")
	}
	if _, err := ParseCRCList([]byte{1, 2, 3, 4}); err != ErrCRCLength {
		t.Errorf("err = %v", err)
	}
}

func TestCmdString(t *testing.T) {
	if CmdGetCRC32.String() != "GET_CRC32" || Cmd(99).String() != "CMD_99" {
		t.Error(CmdGetCRC32.String(), Cmd(99).String())
	}
}

func TestLatestRID(t *testing.T) {
	if b := MarshalLatestRID(0x0102); !bytes.Equal(b, []byte{2, 1}) {
		t.Fatalf("%x", b)
	}
	if rid, err := ParseLatestRID([]byte{7, 0}); rid != 7 || err != nil {
		t.Fatal(rid, err)
	}
	if _, err := ParseLatestRID([]byte{7}); err != ErrLatestRIDLength {
		t.Fatal(err)
	}
}
