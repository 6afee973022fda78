package protocol

import (
	"bytes"
	"path"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// seedCaptured adds every captured message (or its payload) to the corpus.
func seedCaptured(f *testing.F, payload bool) {
	for _, name := range []string{"select_image.txt", "get_servers.txt", "get_crc32.txt", "get_block.txt"} {
		for _, m := range testutil.ReadWire(f, name) {
			if payload {
				f.Add(m.Bytes[m.HeaderLen():])
			} else {
				f.Add(m.Bytes)
			}
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	seedCaptured(f, false)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		enc := r.Marshal()
		again, err := ParseRequest(enc[:])
		if err != nil || again != r {
			t.Fatalf("round trip %+v -> %+v (%v)", r, again, err)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	seedCaptured(f, false)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseReply(b)
		if err != nil {
			return
		}
		enc := r.Marshal()
		if !bytes.Equal(enc[:], b[:ReplySize]) {
			t.Fatalf("re-encode %x != %x", enc, b[:ReplySize])
		}
	})
}

func FuzzParseSelectImage(f *testing.F) {
	seedCaptured(f, true)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSelectImage(b)
		if err != nil {
			return
		}
		again, err := ParseSelectImage(s.Marshal())
		if err != nil || again != s {
			t.Fatalf("round trip %+v -> %+v (%v)", s, again, err)
		}
		_ = ValidImageName(s.Name)
	})
}

func FuzzParseSelectImageReply(f *testing.F) {
	seedCaptured(f, true)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSelectImageReply(b)
		if err != nil {
			return
		}
		again, err := ParseSelectImageReply(s.Marshal())
		if err != nil || again != s {
			t.Fatalf("round trip %+v -> %+v (%v)", s, again, err)
		}
	})
}

func FuzzParseServerList(f *testing.F) {
	seedCaptured(f, true)
	f.Fuzz(func(t *testing.T, b []byte) {
		list := ParseServerList(b)
		if len(list) > len(b)/ServerEntrySize {
			t.Fatalf("%d entries from %d bytes", len(list), len(b))
		}
		if len(list) > NumberServers {
			list = list[:NumberServers]
		}
		again := ParseServerList(MarshalServerList(list))
		if len(again) != len(list) {
			t.Fatalf("round trip %v -> %v", list, again)
		}
		for i := range list {
			if again[i] != list[i] {
				t.Fatalf("round trip %v -> %v", list, again)
			}
		}
	})
}

func FuzzParseCRCList(f *testing.F) {
	seedCaptured(f, true)
	f.Fuzz(func(t *testing.T, b []byte) {
		list, err := ParseCRCList(b)
		if err != nil {
			return
		}
		if !bytes.Equal(MarshalCRCList(list), b) {
			t.Fatal("valid list does not re-encode to the same bytes")
		}
	})
}

func FuzzParseLatestRID(f *testing.F) {
	f.Add([]byte{3, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		rid, err := ParseLatestRID(b)
		if err != nil {
			return
		}
		if !bytes.Equal(MarshalLatestRID(rid), b) {
			t.Fatalf("rid %d re-encodes differently", rid)
		}
	})
}

// FuzzValidImageName: an accepted name is canonical, relative and without
// hidden components, so no two accepted names address the same file.
func FuzzValidImageName(f *testing.F) {
	for _, s := range []string{"test", "sub/dir/odd.img", "a//b", "a/./b", "a/", "/a", "a/../b", ".x", "x/.y", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if !ValidImageName(name) {
			return
		}
		if path.Clean(name) != name || path.IsAbs(name) || len(name) > MaxNameLength || strings.IndexByte(name, 0) >= 0 {
			t.Fatalf("accepted non-canonical name %q", name)
		}
		for _, c := range strings.Split(name, "/") {
			if c == "" || c[0] == '.' {
				t.Fatalf("accepted %q with component %q", name, c)
			}
		}
	})
}

func FuzzParseNBDRequest(f *testing.F) {
	var b [NBDRequestSize]byte
	(&NBDRequest{Type: NBDCmdRead, Cookie: 7, Offset: 4096, Length: 131072}).MarshalTo(b[:])
	f.Add(b[:])
	f.Add(b[:27])
	f.Add([]byte("\x25\x60\x95\x13\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseNBDRequest(b)
		if err != nil {
			return
		}
		var enc [NBDRequestSize]byte
		r.MarshalTo(enc[:])
		if !bytes.Equal(enc[:], b[:NBDRequestSize]) {
			t.Fatalf("re-encode %x != %x", enc, b[:NBDRequestSize])
		}
	})
}
