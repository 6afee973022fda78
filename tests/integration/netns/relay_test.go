package netns

import (
	"context"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// relay is a recording TCP relay in front of a DNBD3 server: it forwards
// both directions unchanged and decodes the requests flowing to the
// server, so a test can see what a proxy asked its uplink for (hop counts,
// flags).
type relay struct {
	ln     net.Listener
	ns     string
	target string

	mu       sync.Mutex
	selects  []protocol.SelectImage
	hops     map[uint8]int   // GET_BLOCK count by raw hop byte
	hopBytes map[uint8]int64 // GET_BLOCK bytes by raw hop byte
	errs     []string
}

// startRelay listens on listen in namespace ns and forwards every
// connection to target (dialled in ns too).
func startRelay(t *testing.T, ns, listen, target string) *relay {
	t.Helper()
	ln, err := listenIn(ns, listen)
	if err != nil {
		t.Fatalf("relay: listen on %s in %s: %v", listen, ns, err)
	}
	r := &relay{ln: ln, ns: ns, target: target, hops: map[uint8]int{}, hopBytes: map[uint8]int64{}}
	var wg sync.WaitGroup
	var connMu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			up, err := dialIn(ctx, ns, target)
			cancel()
			if err != nil {
				r.note("dial %s: %v", target, err)
				c.Close()
				continue
			}
			connMu.Lock()
			conns = append(conns, c, up)
			connMu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(c, up); c.Close() }()
			go func() { defer wg.Done(); r.forward(c, up); up.Close() }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		connMu.Lock()
		for _, c := range conns {
			c.Close()
		}
		connMu.Unlock()
		wg.Wait()
	})
	return r
}

func (r *relay) addr() string { return r.ln.Addr().String() }

func (r *relay) note(format string, a ...any) {
	r.mu.Lock()
	r.errs = append(r.errs, fmt.Sprintf(format, a...))
	r.mu.Unlock()
}

// forward copies requests from the client c to the server up, decoding
// each header (and the SELECT_IMAGE payload).
func (r *relay) forward(c, up net.Conn) {
	var hdr [protocol.RequestSize]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		req, err := protocol.ParseRequest(hdr[:])
		if err != nil {
			r.note("bad request header %x: %v", hdr, err)
			return
		}
		if _, err := up.Write(hdr[:]); err != nil {
			return
		}
		if req.Cmd == protocol.CmdGetBlock {
			r.mu.Lock()
			r.hops[req.Hops]++
			r.hopBytes[req.Hops] += int64(req.Size)
			r.mu.Unlock()
			continue
		}
		if req.Size > protocol.MaxPayload {
			r.note("%v with a %d-byte payload", req.Cmd, req.Size)
			return
		}
		payload := make([]byte, req.Size)
		if _, err := io.ReadFull(c, payload); err != nil {
			return
		}
		if req.Cmd == protocol.CmdSelectImage {
			if sel, err := protocol.ParseSelectImage(payload); err == nil {
				r.mu.Lock()
				r.selects = append(r.selects, sel)
				r.mu.Unlock()
			}
		}
		if _, err := up.Write(payload); err != nil {
			return
		}
	}
}

// summary describes what the relay saw.
func (r *relay) summary() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, s := range r.selects {
		fmt.Fprintf(&b, "SELECT_IMAGE %q rid %d flags %#02x; ", s.Name, s.RID, s.Flags)
	}
	keys := make([]int, 0, len(r.hops))
	for h := range r.hops {
		keys = append(keys, int(h))
	}
	sort.Ints(keys)
	for _, h := range keys {
		fmt.Fprintf(&b, "GET_BLOCK hops=%#02x: %d requests, %d bytes; ", h, r.hops[uint8(h)], r.hopBytes[uint8(h)])
	}
	if len(r.errs) > 0 {
		fmt.Fprintf(&b, "errors: %s", strings.Join(r.errs, "; "))
	}
	return b.String()
}
