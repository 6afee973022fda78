package server

import (
	"bytes"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// serveOne does a handshake and one read on a new connection and checks
// the data.
func serveOne(t *testing.T, addr, name string, data []byte) {
	t.Helper()
	c := dial(t, addr)
	handshake(t, c, name, 1)
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: 4096, Size: 4096, Handle: 7}, nil)
	r, p := readReply(t, c)
	if r.Cmd != protocol.CmdGetBlock || r.Handle != 7 || !bytes.Equal(p, data[4096:8192]) {
		t.Fatalf("reply %v, data ok %v", r, bytes.Equal(p, data[4096:8192]))
	}
	c.Close()
}

// A connection that stops anywhere in its handshake, or after it, never
// holds up the accept loop.
func TestAcceptLoopNotHeldByStalledClients(t *testing.T) {
	base := t.TempDir()
	data := testutil.GenImage(0, 1<<20)
	writeFile(t, filepath.Join(base, "img.r1"), data)
	// A stalled client is dropped only after clientTimeout (60 s); dial's
	// 20 s deadline fails the test if the accept loop waited for one.
	ts := startServer(t, base, "clientTimeout=60000\n", nil)
	sel := protocol.SelectImage{Version: 3, Name: "img", RID: 1}.Marshal()
	selHdr := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(sel))}.Marshal()
	stalls := map[string][]byte{
		"nothing":           nil,
		"half a header":     selHdr[:10],
		"header only":       selHdr[:],
		"half the payload":  append(selHdr[:], sel[:len(sel)/2]...),
		"handshake":         append(selHdr[:], sel...),
		"http request line": []byte("GET /query HTTP/1.1\r\n"),
	}
	for name, prefix := range stalls {
		t.Run(name, func(t *testing.T) {
			stalled := dial(t, ts.addr)
			if len(prefix) > 0 {
				if _, err := stalled.Write(prefix); err != nil {
					t.Fatal(err)
				}
			}
			serveOne(t, ts.addr, "img", data)
			// and the stalled one is still there, waiting
			stalled.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			buf := make([]byte, 64)
			for {
				_, err := stalled.Read(buf) // a handshake reply may come first
				if isTimeout(err) {
					break
				}
				if err != nil {
					t.Fatalf("stalled connection: %v; want it still open", err)
				}
			}
		})
	}
}

// Many clients at once, each with a handshake and a read, then one alone:
// everyone is served.
func TestAcceptBurstsAndLoneConnections(t *testing.T) {
	base := t.TempDir()
	data := testutil.GenImage(0, 1<<20)
	writeFile(t, filepath.Join(base, "img.r1"), data)
	ts := startServer(t, base, "", nil)
	for range 3 {
		var wg sync.WaitGroup
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveOne(t, ts.addr, "img", data)
			}()
		}
		wg.Wait()
		serveOne(t, ts.addr, "img", data)
	}
}

// A proxy looking up an unknown image upstream (here: an uplink that
// accepts but never answers) does not hold up other clients.
func TestAcceptLoopNotHeldByProxyLookup(t *testing.T) {
	blackHole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer blackHole.Close()
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := blackHole.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	base := t.TempDir()
	data := genImage(t, base, "local.r1", 1<<20, false)
	// The lookup waits up to uplinkTimeout (60 s) for an answer; dial's
	// 20 s deadline below fails the test if the accept loop waited with it.
	px := startProxy(t, base, "uplinkTimeout=60000\n", "", nil, blackHole.Addr().String())
	lookup := dial(t, px.addr)
	p := protocol.SelectImage{Version: 3, Name: "unknown", RID: 1}.Marshal()
	send(t, lookup, protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}, p)
	waitFor(t, 10*time.Second, "the lookup to reach the uplink", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(held) > 0
	})
	serveOne(t, px.addr, "local", data)
	// The lookup is still going on: its client has no answer yet.
	lookup.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := lookup.Read(make([]byte, 1)); n != 0 || !isTimeout(err) {
		t.Fatalf("lookup connection: %d bytes, %v; want it still waiting", n, err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
