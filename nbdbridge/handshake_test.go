package nbdbridge

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// hsTestClient is the client side of the fixed newstyle handshake.
type hsTestClient struct {
	t    testing.TB
	conn net.Conn
}

type hsTestReply struct {
	opt, typ uint32
	data     []byte
}

// hsTestStart connects a client to ServeNBD over a socketpair and reads
// the greeting; it returns the client and ServeNBD's result channel.
func hsTestStart(t testing.TB, e *Engine, name, desc string, clientFlags uint32) (*hsTestClient, <-chan error) {
	t.Helper()
	srv, cli := engTestSocketPair(t)
	res := make(chan error, 1)
	go func() { res <- e.ServeNBD(context.Background(), srv, name, desc) }()
	c := &hsTestClient{t: t, conn: cli}
	cli.SetDeadline(time.Now().Add(20 * time.Second))
	var g [18]byte
	if _, err := io.ReadFull(cli, g[:]); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	if binary.BigEndian.Uint64(g[0:]) != protocol.NEGOTIATION_MAGIC_OLDSTYLE ||
		binary.BigEndian.Uint64(g[8:]) != protocol.NEGOTIATION_MAGIC_OPTION ||
		binary.BigEndian.Uint16(g[16:]) != 3 {
		t.Fatalf("bad greeting %x", g)
	}
	cli.Write(binary.BigEndian.AppendUint32(nil, clientFlags))
	return c, res
}

func (c *hsTestClient) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, protocol.NEGOTIATION_MAGIC_OPTION)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.conn.Write(append(b, data...))
}

func (c *hsTestClient) reply() hsTestReply {
	c.t.Helper()
	var h [20]byte
	if _, err := io.ReadFull(c.conn, h[:]); err != nil {
		c.t.Fatalf("option reply: %v", err)
	}
	if m := binary.BigEndian.Uint64(h[:]); m != protocol.NEGOTIATION_MAGIC_REPLY {
		c.t.Fatalf("bad option reply magic %#x", m)
	}
	r := hsTestReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c.conn, r.data); err != nil {
		c.t.Fatalf("option reply data: %v", err)
	}
	return r
}

func (c *hsTestClient) expect(opt, typ uint32) hsTestReply {
	c.t.Helper()
	r := c.reply()
	if r.opt != opt || r.typ != typ {
		c.t.Fatalf("reply (opt %d, type %#x, %q), want (opt %d, type %#x)", r.opt, r.typ, r.data, opt, typ)
	}
	return r
}

// closed reports whether the server closed the connection.
// closed reports whether the server closed the connection: EOF, or
// ECONNRESET when it closed with the client's last request still unread
// in its receive queue (Linux unix sockets report that to the peer).
func (c *hsTestClient) closed() bool {
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.conn.Read(make([]byte, 1))
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func hsTestInfoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// expectInfo reads the INFO replies of INFO/GO up to the ACK.
func (c *hsTestClient) expectInfo(opt uint32, e *Engine, name, desc string) {
	c.t.Helper()
	got := map[uint16][]byte{}
	for {
		r := c.reply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ == wireRepAck {
			break
		}
		if r.typ != wireRepInfo || len(r.data) < 2 {
			c.t.Fatalf("unexpected reply type %#x %q", r.typ, r.data)
		}
		got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	want := map[uint16][]byte{
		wireInfoExport:    binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64(nil, uint64(e.Size())), e.Flags()),
		wireInfoName:      []byte(name),
		wireInfoBlockSize: {0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0},
	}
	if desc != "" {
		want[wireInfoDescription] = []byte(desc)
	}
	if len(got) != len(want) {
		c.t.Errorf("got %d info replies, want %d", len(got), len(want))
	}
	for k, v := range want {
		if !bytes.Equal(got[k], v) {
			c.t.Errorf("info %d: %x, want %x", k, got[k], v)
		}
	}
}

func TestHandshakeOptionsThenGo(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(9, 1<<20)
	e := NewEngine(NewMemoryBackendFrom(bytes.Clone(data)), EngineOptions{})
	defer e.Close()
	c, res := hsTestStart(t, e, "disk", "a test disk", wireClientFlagFixedNewstyle|wireClientFlagNoZeroes)

	c.option(wireOptInfo, hsTestInfoData("", wireInfoBlockSize))
	c.expectInfo(wireOptInfo, e, "disk", "a test disk")
	c.option(wireOptInfo, hsTestInfoData("disk"))
	c.expectInfo(wireOptInfo, e, "disk", "a test disk")

	c.option(wireOptList, nil)
	r := c.expect(wireOptList, wireRepServer)
	if !bytes.Equal(r.data, append([]byte{0, 0, 0, 4}, "disk"...)) {
		t.Errorf("LIST entry %q", r.data)
	}
	c.expect(wireOptList, wireRepAck)
	c.option(wireOptList, []byte{1})
	c.expect(wireOptList, wireRepErrInvalid)

	c.option(wireOptStructuredRepl, nil)
	c.expect(wireOptStructuredRepl, wireRepErrUnsup)
	c.option(wireOptStartTLS, nil)
	c.expect(wireOptStartTLS, wireRepErrUnsup)
	c.option(10, []byte("0123456789")) // LIST_META_CONTEXT
	c.expect(10, wireRepErrUnsup)
	c.option(0xdead, bytes.Repeat([]byte{'x'}, 5000))
	c.expect(0xdead, wireRepErrUnsup)
	c.option(wireOptInfo, bytes.Repeat([]byte{'x'}, 100<<10)) // too long: drained
	c.expect(wireOptInfo, wireRepErrInvalid)
	c.option(wireOptGo, hsTestInfoData("other"))
	c.expect(wireOptGo, wireRepErrUnknown)
	c.option(wireOptGo, []byte{0, 0, 0, 9, 'x'}) // name longer than the data
	c.expect(wireOptGo, wireRepErrInvalid)
	c.option(wireOptGo, append(hsTestInfoData("disk"), 0)) // odd info list
	c.expect(wireOptGo, wireRepErrInvalid)

	c.option(wireOptGo, hsTestInfoData("disk", wireInfoName, wireInfoDescription))
	c.expectInfo(wireOptGo, e, "disk", "a test disk")

	// Transmission phase on the same connection.
	c.conn.SetDeadline(time.Time{})
	k := newEngTestClient(t, c.conn)
	rr := k.do(wireCmdRead, 0, 4096, 100, nil)
	if rr.errno != 0 || !bytes.Equal(rr.data, data[4096:4196]) {
		t.Fatal("READ after GO failed")
	}
	k.disc()
	if err := engTestResult(t, res); !errors.Is(err, ErrDisconnected) {
		t.Errorf("ServeNBD: %v", err)
	}
}

func TestHandshakeExportName(t *testing.T) {
	engTestNoLeak(t)
	data := engTestRandom(10, 1<<20)
	e := NewEngine(NewMemoryBackendFrom(bytes.Clone(data)), EngineOptions{ReadOnly: true})
	defer e.Close()
	for _, tc := range []struct {
		flags uint32
		name  string
		n     int
	}{
		{wireClientFlagFixedNewstyle | wireClientFlagNoZeroes, "", 10},
		{wireClientFlagFixedNewstyle, "disk", 134},
		{0, "disk", 134}, // plain newstyle client
	} {
		c, res := hsTestStart(t, e, "disk", "", tc.flags)
		c.option(wireOptExportName, []byte(tc.name))
		b := make([]byte, tc.n)
		if _, err := io.ReadFull(c.conn, b); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(b) != 1<<20 || binary.BigEndian.Uint16(b[8:]) != e.Flags() ||
			!bytes.Equal(b[10:], make([]byte, tc.n-10)) {
			t.Errorf("EXPORT_NAME reply %x", b)
		}
		c.conn.SetDeadline(time.Time{})
		k := newEngTestClient(t, c.conn)
		rr := k.do(wireCmdRead, 0, 0, 16, nil)
		if rr.errno != 0 || !bytes.Equal(rr.data, data[:16]) {
			t.Fatal("READ after EXPORT_NAME failed")
		}
		engTestExpect(t, "WRITE on read-only", k.do(wireCmdWrite, 0, 0, 1, []byte{1}), wireEPERM)
		k.disc()
		engTestResult(t, res)
	}
}

func TestHandshakeFailures(t *testing.T) {
	engTestNoLeak(t)
	e := NewEngine(NewMemoryBackend(1<<20), EngineOptions{})
	defer e.Close()
	fixed := wireClientFlagFixedNewstyle
	for _, tc := range []struct {
		name  string
		flags uint32
		run   func(c *hsTestClient)
		want  error
	}{
		{"unknown export name", fixed, func(c *hsTestClient) { c.option(wireOptExportName, []byte("nope")) }, nil},
		{"abort", fixed, func(c *hsTestClient) {
			c.option(wireOptAbort, nil)
			c.expect(wireOptAbort, wireRepAck)
		}, errHandshakeAborted},
		{"unknown client flags", 1 << 7, func(c *hsTestClient) {}, nil},
		{"bad option magic", fixed, func(c *hsTestClient) { c.conn.Write(make([]byte, 16)) }, nil},
		{"huge option", fixed, func(c *hsTestClient) {
			c.conn.Write(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(
				binary.BigEndian.AppendUint64(nil, protocol.NEGOTIATION_MAGIC_OPTION), 99), 1<<30))
		}, nil},
		{"too many options", fixed, func(c *hsTestClient) {
			for range maxOptions {
				c.option(wireOptList, nil)
				c.expect(wireOptList, wireRepServer)
				c.expect(wireOptList, wireRepAck)
			}
			c.option(wireOptList, nil)
		}, nil},
		{"client gone", fixed, func(c *hsTestClient) { c.option(wireOptList, nil); c.conn.Close() }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, res := hsTestStart(t, e, "disk", "", tc.flags)
			tc.run(c)
			err := engTestResult(t, res)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Errorf("ServeNBD: %v, want %v", err, tc.want)
			}
			if tc.name != "client gone" && !c.closed() {
				t.Error("connection not closed")
			}
		})
	}
}

func TestHandshakeTimeout(t *testing.T) {
	engTestNoLeak(t)
	e := NewEngine(NewMemoryBackend(4096), EngineOptions{})
	e.handshakeTimeout = 100 * time.Millisecond
	defer e.Close()
	c, res := hsTestStart(t, e, "", "", wireClientFlagFixedNewstyle)
	err := engTestResult(t, res)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("ServeNBD: %v, want a timeout", err)
	}
	if !c.closed() {
		t.Error("connection not closed")
	}
}

// FuzzHandshake feeds arbitrary client bytes to the server side of the
// handshake: it must neither panic nor hang.
func FuzzHandshake(f *testing.F) {
	opt := func(id uint32, data []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, protocol.NEGOTIATION_MAGIC_OPTION)
		b = binary.BigEndian.AppendUint32(b, id)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	flags := []byte{0, 0, 0, 3}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(cat(flags, opt(wireOptGo, hsTestInfoData("", 3))))
	f.Add(cat(flags, opt(wireOptInfo, hsTestInfoData("disk", 0, 1, 2, 3)), opt(wireOptList, nil), opt(wireOptExportName, nil)))
	f.Add(cat([]byte{0, 0, 0, 1}, opt(wireOptStructuredRepl, nil), opt(wireOptAbort, nil)))
	f.Add(cat(flags, opt(wireOptGo, []byte{0xff, 0xff, 0xff, 0xff, 0})))
	f.Add(cat(flags, opt(0xffffffff, make([]byte, 9000))))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		x := &exportConfig{name: "disk", description: "d", size: func() int64 { return 1 << 20 },
			flags: 0x16d, minBlock: 1, prefBlock: 4096, maxBlock: 32 << 20}
		done := make(chan error, 1)
		go func() { done <- negotiate(bufio.NewReader(bytes.NewReader(in)), io.Discard, x) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("negotiate hangs")
		}
	})
}

func TestParseInfoRequest(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		name string
		ok   bool
	}{
		{hsTestInfoData("abc", 1, 2), "abc", true},
		{hsTestInfoData(""), "", true},
		{[]byte{0, 0, 0}, "", false},
		{[]byte{0, 0, 0, 0, 0}, "", false},
		{[]byte{0xff, 0xff, 0xff, 0xff, 0, 0}, "", false},
		{append(hsTestInfoData("a", 1), 0), "", false},
		{[]byte{0, 0, 0, 0, 0, 2, 0, 1}, "", false},
	} {
		name, ok := parseInfoRequest(tc.in)
		if name != tc.name || ok != tc.ok {
			t.Errorf("parseInfoRequest(%x) = %q, %v", tc.in, name, ok)
		}
	}
}
