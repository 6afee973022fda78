package server

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// bgrForwarder is a TCP relay in front of an uplink server that
//   - makes the uplink slow: a GET_BLOCK reply goes down no earlier than
//     delay after its request went up,
//   - counts the background replication requests (hop flag 0x80) that are
//     outstanding (forwarded up, reply not yet passed down) and their
//     maximum,
//   - can hold back the replies to relayed client requests (hop count >= 1,
//     no flag) while every other reply passes; replies are matched to
//     requests by handle, so held ones may be overtaken.
type bgrForwarder struct {
	t      testing.TB
	ln     net.Listener
	target string
	delay  time.Duration

	mu         sync.Mutex
	conns      []net.Conn
	bgr        []protocol.Request // BGR GET_BLOCKs in arrival order
	clients    []protocol.Request // relayed client GET_BLOCKs in arrival order
	bgrOut     int                // BGR requests outstanding
	bgrMax     int                // most BGR requests outstanding at once
	holdClient bool
	held       []heldReply
	wg         sync.WaitGroup
}

type heldReply struct {
	fc  *fwConn
	msg []byte // header and payload
}

// fwConn is one relayed connection: the GET_BLOCKs in flight by handle
// and the lock of writes to the proxy.
type fwConn struct {
	c, u    net.Conn
	wmu     sync.Mutex
	pending map[uint64]fwPending // guarded by bgrForwarder.mu
}

type fwPending struct {
	req protocol.Request
	at  time.Time
}

func isBGRRequest(r protocol.Request) bool { return r.Hops&protocol.HopFlagBgRep != 0 }

func isClientRelay(r protocol.Request) bool {
	return protocol.HopCount(r.Hops) >= 1 && r.Hops&(protocol.HopFlagBgRep|protocol.HopFlagPrefetch) == 0
}

func startBGRForwarder(t testing.TB, target string, delay time.Duration) *bgrForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &bgrForwarder{t: t, ln: ln, target: target, delay: delay}
	f.wg.Add(1)
	go f.accept()
	t.Cleanup(f.close)
	return f
}

func (f *bgrForwarder) addr() string { return f.ln.Addr().String() }

func (f *bgrForwarder) close() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.held = nil
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *bgrForwarder) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", f.target)
		if err != nil {
			c.Close()
			continue
		}
		fc := &fwConn{c: c, u: u, pending: map[uint64]fwPending{}}
		f.mu.Lock()
		f.conns = append(f.conns, c, u)
		f.mu.Unlock()
		f.wg.Add(2)
		go f.up(fc)
		go f.down(fc)
	}
}

// up copies requests to the server, registering GET_BLOCKs first.
func (f *bgrForwarder) up(fc *fwConn) {
	defer f.wg.Done()
	defer fc.u.Close()
	var hdr [protocol.RequestSize]byte
	for {
		if _, err := io.ReadFull(fc.c, hdr[:]); err != nil {
			return
		}
		req, err := protocol.ParseRequest(hdr[:])
		if err != nil {
			return
		}
		raw := append([]byte(nil), hdr[:]...)
		if req.Cmd == protocol.CmdGetBlock {
			f.mu.Lock()
			fc.pending[req.Handle] = fwPending{req: req, at: time.Now()}
			switch {
			case isBGRRequest(req):
				f.bgr = append(f.bgr, req)
				f.bgrOut++
				f.bgrMax = max(f.bgrMax, f.bgrOut)
			case isClientRelay(req):
				f.clients = append(f.clients, req)
			}
			f.mu.Unlock()
		} else if req.Size > 0 {
			p := make([]byte, req.Size)
			if _, err := io.ReadFull(fc.c, p); err != nil {
				return
			}
			raw = append(raw, p...)
		}
		if _, err := fc.u.Write(raw); err != nil {
			return
		}
	}
}

// down copies replies to the proxy: GET_BLOCK replies not before delay
// after their request, client replies stashed while holding.
func (f *bgrForwarder) down(fc *fwConn) {
	defer f.wg.Done()
	defer fc.c.Close()
	var hdr [protocol.ReplySize]byte
	for {
		if _, err := io.ReadFull(fc.u, hdr[:]); err != nil {
			return
		}
		rep, err := protocol.ParseReply(hdr[:])
		if err != nil {
			return
		}
		msg := make([]byte, protocol.ReplySize+int(rep.Size))
		copy(msg, hdr[:])
		if _, err := io.ReadFull(fc.u, msg[protocol.ReplySize:]); err != nil {
			return
		}
		var pend fwPending
		var isBlock bool
		if rep.Cmd == protocol.CmdGetBlock || rep.Cmd == protocol.CmdError {
			f.mu.Lock()
			pend, isBlock = fc.pending[rep.Handle]
			f.mu.Unlock()
		}
		if isBlock {
			if wait := time.Until(pend.at.Add(f.delay)); wait > 0 {
				time.Sleep(wait)
			}
			f.mu.Lock()
			delete(fc.pending, rep.Handle)
			if isBGRRequest(pend.req) {
				f.bgrOut-- // before the proxy can see the reply
			}
			if f.holdClient && isClientRelay(pend.req) {
				f.held = append(f.held, heldReply{fc: fc, msg: msg})
				f.mu.Unlock()
				continue
			}
			f.mu.Unlock()
		}
		fc.wmu.Lock()
		_, err = fc.c.Write(msg)
		fc.wmu.Unlock()
		if err != nil {
			return
		}
	}
}

// setHoldClient starts or ends holding client replies; ending it sends
// the held ones.
func (f *bgrForwarder) setHoldClient(on bool) {
	f.mu.Lock()
	f.holdClient = on
	var held []heldReply
	if !on {
		held, f.held = f.held, nil
	}
	f.mu.Unlock()
	for _, h := range held {
		h.fc.wmu.Lock()
		h.fc.c.Write(h.msg)
		h.fc.wmu.Unlock()
	}
}

// bgrRequests returns the BGR GET_BLOCKs seen so far.
func (f *bgrForwarder) bgrRequests() []protocol.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]protocol.Request(nil), f.bgr...)
}

// clientRequests returns the relayed client GET_BLOCKs seen so far.
func (f *bgrForwarder) clientRequests() []protocol.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]protocol.Request(nil), f.clients...)
}

// outstanding returns the BGR requests outstanding now and at most.
func (f *bgrForwarder) outstanding() (now, most int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bgrOut, f.bgrMax
}

// bgrFetches returns the start offsets of up's background replication
// fetches in flight.
func bgrFetches(up *uplink) map[int64]bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	out := map[int64]bool{}
	for _, f := range up.fetches {
		if f.kind == fetchBGR {
			out[f.start] = true
		}
	}
	return out
}

// TestBGRPausesWhileClientsWait: with full background replication over a
// slow uplink, a client request relayed while replication runs stops the
// start of new replication requests: the ones in flight complete, no other
// one is started (in the proxy's fetch queue or on the wire) while the
// client's reply is outstanding, and once it arrived replication resumes
// and completes the image.
func TestBGRPausesWhileClientsWait(t *testing.T) {
	const size = 8 << 20
	obase := t.TempDir()
	data := genImage(t, obase, "img.r1", size, true)
	origin := runServer(t, obase, "", nil, nil)
	fw := startBGRForwarder(t, origin.addr, 20*time.Millisecond)
	proxy := startProxy(t, "", "backgroundReplication=true\nbgrWindowSize=4\n", "", nil, fw.addr())
	t.Cleanup(func() { fw.setHoldClient(false) })

	c := dial(t, proxy.addr)
	handshake(t, c, "img", 1) // clones the image; replication starts (bgrMinClients=0)
	img := loaded(t, proxy.Server, "img", 1)
	waitFor(t, 10*time.Second, "background replication to run", func() bool { return len(fw.bgrRequests()) >= 4 })
	up := img.up.Load()
	if up == nil {
		t.Fatal("no uplink")
	}

	// a client reads the last block, which replication (in order from
	// the start) is far from; its reply is held at the forwarder
	fw.setHoldClient(true)
	const off = size - protocol.BlockSize
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: off, Size: protocol.BlockSize, Handle: 77}, nil)
	waitFor(t, 10*time.Second, "the client's request upstream", func() bool {
		for _, r := range fw.clientRequests() {
			if r.Offset == off {
				return true
			}
		}
		return false
	})
	// From the client fetch's start on, no replication fetch may start:
	// every one in flight from now on is in this snapshot, and every
	// replication request reaching the server from now on is one of them.
	inFlight := bgrFetches(up)
	seen := len(fw.bgrRequests())
	up.mu.Lock()
	waiting := up.clientWait
	up.mu.Unlock()
	if waiting < 1 {
		t.Fatalf("clientWait %d while the client's reply is held", waiting)
	}
	check := func(when string) {
		t.Helper()
		for start := range bgrFetches(up) {
			if !inFlight[start] {
				t.Fatalf("%s: replication fetch at %d started while a client waits (in flight at the pause: %v)", when, start, inFlight)
			}
		}
		for _, r := range fw.bgrRequests()[seen:] {
			if !inFlight[int64(r.Offset)] {
				t.Fatalf("%s: replication request %v sent while a client waits", when, r)
			}
		}
	}
	// the replication requests in flight complete (their replies pass)
	waitFor(t, 10*time.Second, "the replication fetches in flight to complete", func() bool {
		check("draining")
		return len(bgrFetches(up)) == 0
	})
	cm := img.cache.Load()
	if cm == nil {
		t.Fatal("image complete during the pause")
	}
	present := cm.Present()
	// Each completion woke the replication loop, and it ticks every
	// 250 ms: watch three ticks for a replication fetch being started.
	for end := time.Now().Add(750 * time.Millisecond); time.Now().Before(end); {
		check("paused")
		time.Sleep(5 * time.Millisecond)
	}
	check("paused")
	if got := cm.Present(); got != present {
		t.Fatalf("%d blocks present after the pause, %d at its start: something was fetched", got, present)
	}
	if !img.incomplete() {
		t.Fatal("image complete during the pause")
	}
	before := len(fw.bgrRequests())

	// the client gets its data; then replication resumes and completes
	fw.setHoldClient(false)
	rep, p := readReply(t, c)
	if rep.Cmd != protocol.CmdGetBlock || rep.Handle != 77 || !bytes.Equal(p, data[off:]) {
		t.Fatalf("client reply %v", rep)
	}
	waitComplete(t, proxy.Server, "img", 20*time.Second)
	if n := len(fw.bgrRequests()); n <= before {
		t.Errorf("no replication request after the client was answered (%d before, %d after)", before, n)
	}
	if fileSHA(t, filepath.Join(proxy.base, "img.r1")) != sha256.Sum256(data) {
		t.Fatal("local copy differs from the origin")
	}
}

// TestBGRWindowSize: the replication requests outstanding at the uplink
// server never exceed bgrWindowSize, and the window is used (slow start
// reaches it over a slow uplink).
func TestBGRWindowSize(t *testing.T) {
	const size = 2 << 20
	obase := t.TempDir()
	data := genImage(t, obase, "img.r1", size, true)
	origin := runServer(t, obase, "", nil, nil)
	for _, n := range []int{1, 3} {
		t.Run("bgrWindowSize="+strconv.Itoa(n), func(t *testing.T) {
			fw := startBGRForwarder(t, origin.addr, 15*time.Millisecond)
			proxy := startProxy(t, "", "backgroundReplication=true\nbgrWindowSize="+strconv.Itoa(n)+"\n", "", nil, fw.addr())
			c := dial(t, proxy.addr)
			handshake(t, c, "img", 1)
			c.Close() // bgrMinClients=0: replication goes on without clients
			waitComplete(t, proxy.Server, "img", 20*time.Second)
			now, most := fw.outstanding()
			if most != n {
				t.Errorf("at most %d replication requests outstanding, want bgrWindowSize=%d", most, n)
			}
			if now != 0 {
				t.Errorf("%d replication requests outstanding after completion", now)
			}
			var total int64
			for _, r := range fw.bgrRequests() {
				if r.Hops != protocol.HopFlagBgRep|1 {
					t.Fatalf("replication request with hops %#x", r.Hops)
				}
				total += int64(r.Size)
			}
			if total != size {
				t.Errorf("%d bytes replicated for a %d-byte image", total, size)
			}
			if fileSHA(t, filepath.Join(proxy.base, "img.r1")) != sha256.Sum256(data) {
				t.Fatal("local copy differs from the origin")
			}
		})
	}
}
