package nbdbridge

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

func TestParseRequest(t *testing.T) {
	b := []byte{0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, // magic, FUA, WRITE
		1, 2, 3, 4, 5, 6, 7, 8, // cookie
		0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
		0, 0, 0x02, 0} // length 512
	h, err := parseRequest(b)
	if err != nil {
		t.Fatal(err)
	}
	want := protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
		CommandFlags: wireCmdFlagFUA, Type: wireCmdWrite, Handle: 0x0102030405060708, Offset: 4096, Length: 512}
	if h != want {
		t.Errorf("parsed %+v, want %+v", h, want)
	}
	var out [wireRequestSize]byte
	putRequest(out[:], h)
	if !bytes.Equal(out[:], b) {
		t.Errorf("putRequest: %x", out)
	}
	b[0] = 0
	if _, err := parseRequest(b); !errors.Is(err, errBadRequestMagic) {
		t.Errorf("bad magic: %v", err)
	}
	if _, err := parseRequest(b[:27]); err == nil {
		t.Error("short header accepted")
	}
	var r [wireReplySize]byte
	putReply(r[:], wireENOSPC, 42)
	if !bytes.Equal(r[:], []byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 42}) {
		t.Errorf("putReply: %x", r)
	}
}

// FuzzParseRequest: any 28 bytes either fail with a magic error or
// round-trip.
func FuzzParseRequest(f *testing.F) {
	var b [wireRequestSize]byte
	putRequest(b[:], protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST, Type: 1, Length: 4096})
	f.Add(b[:])
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := parseRequest(in)
		if err != nil {
			return
		}
		var out [wireRequestSize]byte
		putRequest(out[:], h)
		if !bytes.Equal(out[:], in[:wireRequestSize]) {
			t.Fatalf("round trip %x -> %x", in[:wireRequestSize], out)
		}
	})
}

// engFuzzConn is a net.Conn reading a fixed byte stream and discarding
// what is written.
type engFuzzConn struct {
	r   *bytes.Reader
	out bytes.Buffer
}

func (c *engFuzzConn) Read(p []byte) (int, error)         { return c.r.Read(p) }
func (c *engFuzzConn) Write(p []byte) (int, error)        { return c.out.Write(p) }
func (c *engFuzzConn) Close() error                       { return nil }
func (c *engFuzzConn) LocalAddr() net.Addr                { return &net.UnixAddr{Net: "unix"} }
func (c *engFuzzConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Net: "unix", Name: "fuzz"} }
func (c *engFuzzConn) SetDeadline(t time.Time) error      { return nil }
func (c *engFuzzConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *engFuzzConn) SetWriteDeadline(t time.Time) error { return nil }

// FuzzEngineStream feeds arbitrary bytes to the transmission phase: the
// engine must not panic or hang, and everything it writes must be well
// formed simple replies.
func FuzzEngineStream(f *testing.F) {
	req := func(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
		var b [wireRequestSize]byte
		putRequest(b[:], protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
			CommandFlags: flags, Type: typ, Handle: 7, Offset: off, Length: length})
		return append(b[:], payload...)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(cat(req(wireCmdRead, 0, 0, 512, nil), req(wireCmdDisc, 0, 0, 0, nil)))
	f.Add(cat(req(wireCmdWrite, 1, 100, 4, []byte("abcd")), req(wireCmdFlush, 0, 0, 0, nil),
		req(wireCmdTrim, 0, 0, 4096, nil), req(wireCmdWriteZeroes, 2, 0, 8192, nil)))
	f.Add(cat(req(wireCmdWrite, 0, 0, 70000, make([]byte, 70000)), req(wireCmdRead, 0, 1<<20-1, 2, nil)))
	f.Add(cat(req(wireCmdWrite, 0, 0, 1<<30, nil)))
	f.Add(cat(req(9, 0, 0, 1, nil), []byte{0xde, 0xad}))
	f.Fuzz(func(t *testing.T, in []byte) {
		e := NewEngine(NewMemoryBackend(1<<20), EngineOptions{MaxRequest: 64 << 10, Workers: 4})
		defer e.Close()
		conn := &engFuzzConn{r: bytes.NewReader(in)}
		done := make(chan error, 1)
		go func() { done <- e.ServeConn(context.Background(), conn) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("ServeConn hangs")
		}
		if s := e.Stats(); s.InFlight != 0 || s.Connections != 0 {
			t.Fatalf("after ServeConn: %+v", s)
		}
		// Every reply starts with the reply magic; READ data follows only
		// successful replies, so check the first one.
		out := conn.out.Bytes()
		if len(out) > 0 {
			if _, err := parseReply(out); err != nil {
				t.Fatalf("first reply: %v", err)
			}
		}
	})
}
