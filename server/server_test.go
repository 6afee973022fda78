package server

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func selectRaw(t *testing.T, c net.Conn, payload []byte) {
	t.Helper()
	send(t, c, protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(payload))}, payload)
}

func TestUnknownImageOrRIDClosedWithoutReply(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r2"), make([]byte, 4096))
	ts := startServer(t, base, "", nil)
	for _, s := range []protocol.SelectImage{
		{Version: 3, Name: "nope", RID: 0},
		{Version: 3, Name: "img", RID: 1},
		{Version: 3, Name: "IMG", RID: 2}, // names are case-sensitive
		{Version: 1, Name: "img", RID: 2}, // version too old
	} {
		c := dial(t, ts.addr)
		selectRaw(t, c, s.Marshal())
		expectClosed(t, c, 5*time.Second)
	}
	c := dial(t, ts.addr)
	got := handshake(t, c, "img", 0)
	if got.RID != 2 || got.Size != 4096 || got.Name != "img" {
		t.Fatalf("reply %+v", got)
	}
	// protocol version 2 is accepted and echoed
	c2 := dial(t, ts.addr)
	selectRaw(t, c2, protocol.SelectImage{Version: 2, Name: "img", RID: 2}.Marshal())
	_, p := readReply(t, c2)
	if rep, _ := protocol.ParseSelectImageReply(p); rep.Version != 2 {
		t.Fatalf("reply version %d, want 2", rep.Version)
	}
}

func TestBadMagicAndWrongFirstCommandClose(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 8192))
	ts := startServer(t, base, "", nil)

	c := dial(t, ts.addr)
	c.Write(append([]byte{0x73, 0x00}, make([]byte, 22)...))
	expectClosed(t, c, 5*time.Second)

	c = dial(t, ts.addr)
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Size: 4096}, nil)
	expectClosed(t, c, 5*time.Second)

	c = dial(t, ts.addr)
	handshake(t, c, "img", 1)
	bad := protocol.Request{Cmd: protocol.CmdGetBlock, Size: 4096}.Marshal()
	bad[1] = 0x99
	c.Write(bad[:])
	expectClosed(t, c, 5*time.Second)

	c = dial(t, ts.addr)
	c.Write([]byte{0x00, 0x01, 0x02})
	expectClosed(t, c, 5*time.Second)
}

func TestInvalidNamesRefused(t *testing.T) {
	root := t.TempDir()
	base := filepath.Join(root, "images")
	writeFile(t, filepath.Join(root, "x.r1"), make([]byte, 4096)) // outside basePath
	writeFile(t, filepath.Join(base, ".hidden.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "a", ".b.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "ok.r1"), make([]byte, 4096))
	ts := startServer(t, base, "", nil)
	for _, name := range []string{"../x", "/abs", "a/.b", ".hidden", "./ok", "ok/", "", "a/../ok"} {
		c := dial(t, ts.addr)
		selectRaw(t, c, protocol.SelectImage{Version: 3, Name: name, RID: 1}.Marshal())
		expectClosed(t, c, 5*time.Second)
	}
	if n := len(ts.store.list()); n != 1 {
		t.Errorf("%d images loaded, want only ok:1", n)
	}
}

func TestOversizePayloadRefused(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "", nil)

	c := dial(t, ts.addr)
	p := append(protocol.SelectImage{Version: 3, Name: "img", RID: 1}.Marshal(), make([]byte, 1000)...)
	selectRaw(t, c, p)
	expectClosed(t, c, 5*time.Second)

	c = dial(t, ts.addr)
	handshake(t, c, "img", 1)
	send(t, c, protocol.Request{Cmd: protocol.CmdKeepalive, Size: 1001}, nil)
	expectClosed(t, c, 5*time.Second)
}

func TestSelectPayloadVariants(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r4"), make([]byte, 10001))
	ts := startServer(t, base, "", nil)
	for _, p := range [][]byte{
		{3, 0, 'i', 'm', 'g', 0, 4, 0},                // no flags byte
		{3, 0, 'i', 'm', 'g', 0},                      // no rid, no flags: rid 0
		{3, 0, 'i', 'm', 'g', 0, 4, 0, 0, 1, 2, 3, 4}, // extra bytes ignored
	} {
		c := dial(t, ts.addr)
		selectRaw(t, c, p)
		r, payload := readReply(t, c)
		rep, err := protocol.ParseSelectImageReply(payload)
		if err != nil || r.Handle != 0 || rep.RID != 4 || rep.Size != 12288 {
			t.Errorf("payload %x: reply %v %+v %v", p, r, rep, err)
		}
	}
}

func TestPaddingPipeliningAndCommands(t *testing.T) {
	base := t.TempDir()
	data := testutil.GenImage(0, 10001)
	writeFile(t, filepath.Join(base, "odd.img.r1"), data)
	ts := startServer(t, base, "", nil)
	c := dial(t, ts.addr)
	if s := handshake(t, c, "odd.img", 1); s.Size != 12288 {
		t.Fatalf("size %d", s.Size)
	}
	// 200 pipelined requests of random ranges, sent before reading anything
	type rq struct{ off, n uint64 }
	var reqs []rq
	var batch []byte
	for i := range 200 {
		off := rand.Uint64N(12288)
		n := rand.Uint64N(12288 - off + 1)
		reqs = append(reqs, rq{off, n})
		h := protocol.Request{Cmd: protocol.CmdGetBlock, Size: uint32(n), Offset: off, Handle: uint64(i + 1)}.Marshal()
		batch = append(batch, h[:]...)
		if i == 100 {
			// SET_CLIENT_MODE and LATEST_RID get no reply; an unknown command
			// with a payload is skipped whole.
			for _, cmd := range []protocol.Cmd{protocol.CmdSetClientMode, protocol.CmdLatestRID} {
				h := protocol.Request{Cmd: cmd}.Marshal()
				batch = append(batch, h[:]...)
			}
			h := protocol.Request{Cmd: 77, Size: 5}.Marshal()
			batch = append(append(batch, h[:]...), 1, 2, 3, 4, 5)
		}
	}
	go c.Write(batch)
	padded := append(bytes.Clone(data), make([]byte, 12288-10001)...)
	for i, q := range reqs {
		r, p := readReply(t, c)
		if r.Cmd != protocol.CmdGetBlock || r.Handle != uint64(i+1) || uint64(len(p)) != q.n {
			t.Fatalf("reply %d: %v", i, r)
		}
		if !bytes.Equal(p, padded[q.off:q.off+q.n]) {
			t.Fatalf("reply %d: wrong data for %d+%d", i, q.off, q.n)
		}
	}
	// the handle quirk: KEEPALIVE carries the last GET_BLOCK handle
	send(t, c, protocol.Request{Cmd: protocol.CmdKeepalive, Handle: 999}, nil)
	if r, _ := readReply(t, c); r.Cmd != protocol.CmdKeepalive || r.Handle != 200 {
		t.Fatalf("keepalive reply %v", r)
	}
}

func TestRIDZeroLatestAndOnDemandLoading(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "sub", "dir", "odd.img.r2"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "sub", "dir", "odd.img.r3"), make([]byte, 8192))
	ts := startServer(t, base, "", nil)
	if s := handshake(t, dial(t, ts.addr), "sub/dir/odd.img", 0); s.RID != 3 || s.Size != 8192 {
		t.Fatalf("rid 0 -> %+v", s)
	}
	// a file that appears later is served without a reload
	writeFile(t, filepath.Join(base, "sub", "dir", "odd.img.r10"), make([]byte, 12288))
	if s := handshake(t, dial(t, ts.addr), "sub/dir/odd.img", 0); s.RID != 10 {
		t.Fatalf("rid 0 after new file -> %+v", s)
	}
	writeFile(t, filepath.Join(base, "ondemand.r1"), make([]byte, 4096))
	if s := handshake(t, dial(t, ts.addr), "ondemand", 1); s.RID != 1 {
		t.Fatalf("on demand -> %+v", s)
	}
	// Reload (SIGHUP): removed files go, new files come
	os.Remove(filepath.Join(base, "ondemand.r1"))
	writeFile(t, filepath.Join(base, "newimg.r5"), make([]byte, 4096))
	added, _, removed, err := ts.store.reload()
	if err != nil || added != 1 || removed != 1 {
		t.Fatalf("reload: added %d removed %d err %v", added, removed, err)
	}
	c := dial(t, ts.addr)
	selectRaw(t, c, protocol.SelectImage{Version: 3, Name: "ondemand", RID: 1}.Marshal())
	expectClosed(t, c, 5*time.Second)
}

func TestClientTimeouts(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "clientTimeout=300\n", nil)

	// no complete header within clientTimeout: closed
	start := time.Now()
	c := dial(t, ts.addr)
	c.Write([]byte{0x73, 0x72, 2})
	expectClosed(t, c, 5*time.Second)
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("closed after %v, before clientTimeout", d)
	}
	// idle after the handshake: closed after about 4 x clientTimeout
	c = dial(t, ts.addr)
	handshake(t, c, "img", 1)
	start = time.Now()
	expectClosed(t, c, 5*time.Second)
	if d := time.Since(start); d < 1000*time.Millisecond {
		t.Errorf("idle connection closed after %v, want about 1.2 s", d)
	}
	// keepalives keep it open
	c = dial(t, ts.addr)
	handshake(t, c, "img", 1)
	for range 8 {
		time.Sleep(250 * time.Millisecond)
		send(t, c, protocol.Request{Cmd: protocol.CmdKeepalive}, nil)
		if r, _ := readReply(t, c); r.Cmd != protocol.CmdKeepalive {
			t.Fatalf("reply %v", r)
		}
	}
}

func TestPenaltyDelaysFirstRequest(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "clientPenalty=300000\nserverPenalty=0\n", nil)
	measure := func(flags uint8) time.Duration {
		c := dial(t, ts.addr)
		selectRaw(t, c, protocol.SelectImage{Version: 3, Name: "img", RID: 1, Flags: flags}.Marshal())
		readReply(t, c)
		start := time.Now()
		send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Size: 4096}, nil)
		readReply(t, c)
		return time.Since(start)
	}
	if d := measure(0); d < 200*time.Millisecond {
		t.Errorf("client penalty: first block after %v, want >= 300ms", d)
	}
	if d := measure(protocol.FlagServer); d > 200*time.Millisecond {
		t.Errorf("server peer got the client penalty (%v)", d)
	}
}

func TestMaxClients(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "[limits]\nmaxClients=2\n", nil)
	a, b := dial(t, ts.addr), dial(t, ts.addr)
	handshake(t, a, "img", 1)
	handshake(t, b, "img", 1)
	c := dial(t, ts.addr)
	expectClosed(t, c, 5*time.Second)
	a.Close()
	time.Sleep(100 * time.Millisecond)
	handshake(t, dial(t, ts.addr), "img", 1)
}

// A server with maxClients DNBD3 clients still answers the RPC (and so
// its metrics and status page) from the reserve above maxClients, while
// one more DNBD3 client is refused.
func TestFullServerStillAnswersRPC(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "[limits]\nmaxClients=2\n", nil)
	handshake(t, dial(t, ts.addr), "img", 1)
	handshake(t, dial(t, ts.addr), "img", 1)
	for range 3 {
		code, _, body := httpGet(t, ts.addr, "/query?q=stats")
		if code != 200 || !strings.Contains(string(body), `"clientCount": 2`) {
			t.Fatalf("RPC on a full server: %d %s", code, body)
		}
	}
	c := dial(t, ts.addr)
	c.Write(protocol.SelectImage{Version: 3, Name: "img", RID: 1}.Marshal())
	expectClosed(t, c, 5*time.Second)
}

// TestFuzzedFramesNoPanicNoLeak throws thousands of random and mutated
// frames at the server, then checks it still serves and leaked nothing.
func TestFuzzedFramesNoPanicNoLeak(t *testing.T) {
	base := t.TempDir()
	data := testutil.GenImage(0, 1<<20)
	writeFile(t, filepath.Join(base, "img.r1"), data)
	ts := startServer(t, base, "clientTimeout=500\n", map[string]string{"alt-servers": capturedAltServers})
	before := runtime.NumGoroutine()
	rng := rand.New(rand.NewPCG(1, 2))
	sel := protocol.SelectImage{Version: 3, Name: "img", RID: 1}.Marshal()
	frames := 0
	for conn := 0; conn < 300; conn++ {
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		var buf []byte
		if conn%2 == 0 { // valid handshake first, then garbage
			h := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(sel))}.Marshal()
			buf = append(append(buf, h[:]...), sel...)
		}
		for range 20 {
			req := protocol.Request{
				Cmd:    protocol.Cmd(rng.IntN(12)),
				Size:   uint32(rng.Uint64N(1 << 21)),
				Offset: rng.Uint64(),
				Hops:   uint8(rng.UintN(256)),
				Handle: rng.Uint64(),
			}
			if rng.IntN(2) == 0 {
				req.Size = uint32(rng.IntN(64))
			}
			h := req.Marshal()
			if rng.IntN(10) == 0 {
				h[rng.IntN(24)] ^= byte(1 + rng.IntN(255))
			}
			buf = append(buf, h[:]...)
			if rng.IntN(3) == 0 {
				junk := make([]byte, rng.IntN(64))
				for i := range junk {
					junk[i] = byte(rng.UintN(256))
				}
				buf = append(buf, junk...)
			}
			frames++
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		go func() { c.Write(buf) }()
		io.Copy(io.Discard, c)
		c.Close()
	}
	t.Logf("%d fuzzed frames on 300 connections", frames)
	// the server still serves a well-behaved client correctly
	c := dial(t, ts.addr)
	handshake(t, c, "img", 1)
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Size: 1 << 20, Handle: 1}, nil)
	_, p := readReply(t, c)
	if sha256.Sum256(p) != sha256.Sum256(data) {
		t.Fatal("data mismatch after fuzzing")
	}
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+2 {
		buf := make([]byte, 1<<20)
		t.Fatalf("goroutines: %d before, %d after\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}
