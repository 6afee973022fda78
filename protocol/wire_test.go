package protocol

import (
	"bytes"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestCapturedWire decodes every captured message of the reference programs
// and encodes it again: the bytes must be identical.
func TestCapturedWire(t *testing.T) {
	files := []string{"select_image.txt", "get_servers.txt", "keepalive.txt", "get_block.txt",
		"get_crc32.txt", "get_block_error.txt", "fuse-session.txt", "proxy-uplink.txt"}
	total := 0
	for _, name := range files {
		msgs := testutil.ReadWire(t, name)
		if len(msgs) == 0 {
			t.Fatalf("%s: no messages", name)
		}
		var lastReq Request
		for _, m := range msgs {
			total++
			if m.FromClient {
				r, err := ParseRequest(m.Bytes)
				if err != nil {
					t.Fatalf("%s:%d: %v", name, m.Line, err)
				}
				hdr := r.Marshal()
				if !bytes.Equal(hdr[:], m.Bytes[:RequestSize]) {
					t.Errorf("%s:%d: request re-encodes as %x", name, m.Line, hdr)
				}
				payload := m.Bytes[RequestSize:]
				if r.Cmd != CmdGetBlock && int(r.Size) != len(payload) {
					t.Errorf("%s:%d: size %d but %d payload bytes", name, m.Line, r.Size, len(payload))
				}
				if r.Cmd == CmdSelectImage {
					s, err := ParseSelectImage(payload)
					if err != nil {
						t.Fatalf("%s:%d: %v", name, m.Line, err)
					}
					if !bytes.Equal(s.Marshal(), payload) {
						t.Errorf("%s:%d: select payload re-encodes as %x", name, m.Line, s.Marshal())
					}
				}
				lastReq = r
				continue
			}
			r, err := ParseReply(m.Bytes)
			if err != nil {
				t.Fatalf("%s:%d: %v", name, m.Line, err)
			}
			hdr := r.Marshal()
			if !bytes.Equal(hdr[:], m.Bytes[:ReplySize]) {
				t.Errorf("%s:%d: reply re-encodes as %x", name, m.Line, hdr)
			}
			payload := m.Bytes[ReplySize:]
			switch r.Cmd {
			case CmdSelectImage:
				s, err := ParseSelectImageReply(payload)
				if err != nil {
					t.Fatalf("%s:%d: %v", name, m.Line, err)
				}
				if !bytes.Equal(s.Marshal(), payload) {
					t.Errorf("%s:%d: select reply re-encodes as %x", name, m.Line, s.Marshal())
				}
				if s.Size%BlockSize != 0 || s.RID == 0 {
					t.Errorf("%s:%d: reply size %d rid %d", name, m.Line, s.Size, s.RID)
				}
			case CmdGetServers:
				list := ParseServerList(payload)
				if !bytes.Equal(MarshalServerList(list), payload) {
					t.Errorf("%s:%d: server list re-encodes differently", name, m.Line)
				}
			case CmdGetCRC32:
				if len(payload) == 0 {
					break
				}
				list, err := ParseCRCList(payload)
				if err != nil {
					t.Fatalf("%s:%d: %v", name, m.Line, err)
				}
				if !bytes.Equal(MarshalCRCList(list), payload) {
					t.Errorf("%s:%d: crc list re-encodes differently", name, m.Line)
				}
			case CmdGetBlock:
				if r.Handle != lastReq.Handle || r.Size != lastReq.Size {
					t.Errorf("%s:%d: reply %v does not answer %v", name, m.Line, r, lastReq)
				}
				// The captured images all follow the generator rule; the crctest
				// file ends at 41953361, after which the server pads with zeros.
				for i, b := range payload {
					off := int64(lastReq.Offset) + int64(i)
					want := testutil.GenByte(off)
					if off >= 41953361 {
						want = 0
					}
					if b != want {
						t.Fatalf("%s:%d: data byte %d = %#x, want %#x", name, m.Line, i, b, want)
					}
				}
			}
		}
	}
	t.Logf("%d captured messages decoded and re-encoded", total)
}

func TestCapturedSelectImage(t *testing.T) {
	msgs := testutil.ReadWire(t, "select_image.txt")
	req, _ := ParseSelectImage(msgs[0].Bytes[RequestSize:])
	if want := (SelectImage{Version: 3, Name: "crctest", RID: 0, Flags: 0}); req != want {
		t.Errorf("request = %+v, want %+v", req, want)
	}
	rep, _ := ParseSelectImageReply(msgs[1].Bytes[ReplySize:])
	if want := (SelectImageReply{Version: 3, Name: "crctest", RID: 1, Size: 41955328}); rep != want {
		t.Errorf("reply = %+v, want %+v", rep, want)
	}
	rep2, _ := ParseSelectImageReply(msgs[5].Bytes[ReplySize:])
	if want := (SelectImageReply{Version: 3, Name: "cowsrc", RID: 1, Size: 8388608}); rep2 != want {
		t.Errorf("reply = %+v, want %+v", rep2, want)
	}
	if got := VirtualSize(41953361); got != 41955328 {
		t.Errorf("VirtualSize = %d", got)
	}
	if got := VirtualSize(10001); got != 12288 {
		t.Errorf("VirtualSize(10001) = %d", got)
	}
}

func TestCapturedServerList(t *testing.T) {
	msgs := testutil.ReadWire(t, "get_servers.txt")
	list := ParseServerList(msgs[1].Bytes[ReplySize:])
	want := []ServerEntry{
		{Addr: netip.MustParseAddrPort("127.0.0.2:5003")},
		{Addr: netip.MustParseAddrPort("[::1]:5004")},
	}
	if !slices.Equal(list, want) {
		t.Errorf("list = %v, want %v", list, want)
	}
	r, _ := ParseReply(msgs[3].Bytes)
	if r.Handle != 0x5555 {
		t.Errorf("quirk: GET_SERVERS reply handle = %#x, want the last GET_BLOCK handle 0x5555", r.Handle)
	}
	// an IPv4-mapped IPv6 address is sent as IPv4
	b := MarshalServerList([]ServerEntry{{Addr: netip.MustParseAddrPort("[::ffff:10.0.0.1]:5003")}})
	if b[18] != HostIP4 || !bytes.Equal(b[:4], []byte{10, 0, 0, 1}) || b[16] != 0x13 || b[17] != 0x8b {
		t.Errorf("mapped entry = %x", b)
	}
}

func TestCRCListMatchesReference(t *testing.T) {
	ref, err := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.crc"))
	if err != nil {
		t.Fatal(err)
	}
	img := testutil.GenImage(0, 41953361)
	list, err := ComputeCRCList(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if got := MarshalCRCList(list); !bytes.Equal(got, ref) {
		t.Fatalf("computed .crc %x, reference %x", got, ref)
	}
	want := []uint32{0xdc5b7530, 0x89a22282, 0x470f2919}
	parsed, err := ParseCRCList(ref)
	if err != nil || !slices.Equal(parsed, want) {
		t.Fatalf("ParseCRCList = %x, %v", parsed, err)
	}
	if MasterCRC(want) != 0x87fda4da {
		t.Errorf("master = %#x", MasterCRC(want))
	}
	bad := bytes.Clone(ref)
	bad[5] ^= 1
	if _, err := ParseCRCList(bad); err != ErrCRCMaster {
		t.Errorf("corrupt list: err = %v", err)
	}
}
