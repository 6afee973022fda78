package server

import (
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

const crctestSize = 41953361

// byConn splits a capture with several connections by the "c1"/"c2" tag
// that starts each comment.
func byConn(msgs []testutil.WireMsg, tag string) []testutil.WireMsg {
	var out []testutil.WireMsg
	for _, m := range msgs {
		if strings.HasPrefix(m.Comment, tag+" ") {
			out = append(out, m)
		}
	}
	return out
}

// TestReplayCapturedTraffic replays every captured request of the reference
// programs against our server (set up like the captured one) and requires
// byte-identical replies, including the reply-handle quirk.
func TestReplayCapturedTraffic(t *testing.T) {
	base := crctestFiles(t)
	ts := startServer(t, base, "clientPenalty=0\n", map[string]string{"alt-servers": capturedAltServers})

	t.Run("select_image", func(t *testing.T) {
		msgs := testutil.ReadWire(t, "select_image.txt")
		for i := 0; i < len(msgs); i += 2 {
			replay(t, dial(t, ts.addr), msgs[i:i+2], crctestSize)
		}
	})
	t.Run("fuse-session", func(t *testing.T) {
		msgs := testutil.ReadWire(t, "fuse-session.txt")
		replay(t, dial(t, ts.addr), byConn(msgs, "c2"), crctestSize)
		replay(t, dial(t, ts.addr), byConn(msgs, "c1"), crctestSize)
	})
	t.Run("proxy-uplink", func(t *testing.T) {
		replay(t, dial(t, ts.addr), testutil.ReadWire(t, "proxy-uplink.txt"), crctestSize)
	})
	blocks := testutil.ReadWire(t, "get_block.txt")
	t.Run("get_block", func(t *testing.T) {
		c := dial(t, ts.addr)
		handshake(t, c, "crctest", 1)
		replay(t, c, blocks, crctestSize)
	})
	t.Run("get_block_error", func(t *testing.T) {
		c := dial(t, ts.addr)
		handshake(t, c, "crctest", 1)
		replay(t, c, testutil.ReadWire(t, "get_block_error.txt"), crctestSize)
	})
	t.Run("get_crc32", func(t *testing.T) {
		msgs := testutil.ReadWire(t, "get_crc32.txt")
		c := dial(t, ts.addr)
		handshake(t, c, "crctest", 1)
		replay(t, c, msgs[0:2], crctestSize)
		c2 := dial(t, ts.addr)
		handshake(t, c2, "cowsrc", 0)
		replay(t, c2, msgs[2:4], crctestSize)
	})
	t.Run("get_servers", func(t *testing.T) {
		msgs := testutil.ReadWire(t, "get_servers.txt")
		c := dial(t, ts.addr)
		handshake(t, c, "crctest", 1)
		replay(t, c, msgs[0:2], crctestSize)
		// the raw probe's GET_SERVERS came after a GET_BLOCK with handle 0x5555
		c2 := dial(t, ts.addr)
		handshake(t, c2, "crctest", 1)
		replay(t, c2, append(blocks[len(blocks)-2:len(blocks):len(blocks)], msgs[2:4]...), crctestSize)
	})
	t.Run("keepalive", func(t *testing.T) {
		msgs := testutil.ReadWire(t, "keepalive.txt")
		c := dial(t, ts.addr)
		handshake(t, c, "crctest", 0)
		seq := append([]testutil.WireMsg{}, msgs[0:4]...)
		seq = append(seq, blocks[0:2]...) // the fuse read with handle 0x7fb3f6060010
		seq = append(seq, msgs[4:6]...)
		replay(t, c, seq, crctestSize)
		c2 := dial(t, ts.addr)
		handshake(t, c2, "crctest", 1)
		seq2 := append([]testutil.WireMsg{}, blocks[4:6]...) // GET_BLOCK handle 0x1111
		seq2 = append(seq2, msgs[6:8]...)
		replay(t, c2, seq2, crctestSize)
	})
}
