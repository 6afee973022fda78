package server

import (
	"bytes"
	"io"
	"path/filepath"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// Replies queued in the batch (small reads) leave before any reply made
// after them: GET_BLOCKs pipelined with the switch to NBD mode are answered
// before the switch, and in NBD mode the data of small reads comes before
// the FLUSH and WRITE replies sent in the same burst, each in request order.
func TestNBDModeBatchedRepliesInOrder(t *testing.T) {
	base := t.TempDir()
	const size = 1 << 20
	testutil.WriteGenImage(t, filepath.Join(base, "img.r1"), size)
	want := testutil.GenImage(0, size)
	ts := startServer(t, base, "", nil)
	c := dial(t, ts.addr)
	if sel, ok := selectFlags(t, c, "img", 0, protocol.FlagFeatures); !ok || sel.Features&protocol.FeatureNBD == 0 {
		t.Fatalf("handshake: ok %v, %+v", ok, sel)
	}

	// DNBD3 reads and the switch in one write.
	var burst []byte
	for k := range 3 {
		h := protocol.Request{Cmd: protocol.CmdGetBlock, Offset: uint64(k) * 4096, Size: 4096, Handle: uint64(k)}.Marshal()
		burst = append(burst, h[:]...)
	}
	sw := protocol.Request{Cmd: protocol.CmdNBDMode, Handle: 77}.Marshal()
	burst = append(burst, sw[:]...)
	if _, err := c.Write(burst); err != nil {
		t.Fatal(err)
	}
	for k := range 3 {
		rep, p := readReply(t, c)
		if rep.Cmd != protocol.CmdGetBlock || rep.Handle != uint64(k) || !bytes.Equal(p, want[k*4096:(k+1)*4096]) {
			t.Fatalf("reply %d: %v (data ok %v)", k, rep, bytes.Equal(p, want[k*4096:(k+1)*4096]))
		}
	}
	if rep, p := readReply(t, c); rep.Cmd != protocol.CmdNBDMode || rep.Handle != 77 || len(p) != 0 {
		t.Fatalf("switch reply %v", rep)
	}

	// NBD: small reads, a flush, more reads, a write, a large read.
	type want1 struct {
		errno uint32
		off   uint64
		n     uint32
	}
	var exp []want1
	burst = burst[:0]
	add := func(typ uint16, off uint64, n uint32, payload []byte, errno uint32) {
		var b [protocol.NBDRequestSize]byte
		(&protocol.NBDRequest{Type: typ, Cookie: uint64(len(exp)), Offset: off, Length: n}).MarshalTo(b[:])
		burst = append(append(burst, b[:]...), payload...)
		if typ != protocol.NBDCmdRead {
			n = 0
		}
		exp = append(exp, want1{errno, off, n})
	}
	for k := range 5 {
		add(protocol.NBDCmdRead, uint64(k)*5000, 3000, nil, 0)
	}
	add(protocol.NBDCmdFlush, 0, 0, nil, 0)
	add(protocol.NBDCmdRead, 100, 64<<10, nil, 0)
	add(protocol.NBDCmdWrite, 0, 4, []byte("abcd"), protocol.NBDEPERM)
	add(protocol.NBDCmdRead, 4096, 512<<10, nil, 0)
	add(protocol.NBDCmdRead, 7, 1, nil, 0)
	if _, err := c.Write(burst); err != nil {
		t.Fatal(err)
	}
	for k, e := range exp {
		errno, cookie, data := nbdReply(t, c, e.n)
		if cookie != uint64(k) || errno != e.errno {
			t.Fatalf("reply %d: cookie %d errno %d, want errno %d", k, cookie, errno, e.errno)
		}
		if e.n > 0 && !bytes.Equal(data, want[e.off:e.off+uint64(e.n)]) {
			t.Fatalf("reply %d: data of %d bytes at %d differs", k, e.n, e.off)
		}
	}
	nbdReq(t, c, protocol.NBDCmdDisc, 0, 0, 0, nil)
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after disconnect: %d bytes, %v", n, err)
	}
}
