package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// tsrv is a server on a random loopback port that can be stopped early
// (and restarted on the same base path as a new server).
type tsrv struct {
	*Server
	addr   string
	base   string
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	logs   *logRecorder
}

// runServer starts a server with server.conf "[dnbd3] basePath=base" plus
// conf, the given config files, and hook applied before it serves.
func runServer(t testing.TB, base, conf string, files map[string]string, hook func(*Server)) *tsrv {
	t.Helper()
	return runServerAt(t, "127.0.0.1:0", base, conf, files, hook)
}

// runServerAt is runServer listening on addr.
func runServerAt(t testing.TB, addr, base, conf string, files map[string]string, hook func(*Server)) *tsrv {
	t.Helper()
	dir, cfg := writeConfigDir(t, base, conf, files)
	logs := &logRecorder{next: testutil.Logger(t).Handler()}
	logs.init()
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: slog.New(logs), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if hook != nil {
		hook(srv)
	}
	ts := &tsrv{Server: srv, base: base, logs: logs}
	ts.addr, ts.cancel, ts.done = serveTest(t, srv, addr)
	t.Cleanup(ts.stop)
	return ts
}

// logRecorder is a slog handler that keeps every message and passes
// records on to the test log.
type logRecorder struct {
	next slog.Handler
	mu   *sync.Mutex
	msgs *[]string
}

func (h *logRecorder) init() {
	if h.mu == nil {
		h.mu = &sync.Mutex{}
		h.msgs = &[]string{}
	}
}

func (h *logRecorder) Enabled(ctx context.Context, l slog.Level) bool { return true }

func (h *logRecorder) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	*h.msgs = append(*h.msgs, r.Message)
	h.mu.Unlock()
	return h.next.Handle(ctx, r)
}

func (h *logRecorder) WithAttrs(a []slog.Attr) slog.Handler {
	return &logRecorder{next: h.next.WithAttrs(a), mu: h.mu, msgs: h.msgs}
}

func (h *logRecorder) WithGroup(g string) slog.Handler {
	return &logRecorder{next: h.next.WithGroup(g), mu: h.mu, msgs: h.msgs}
}

// count returns how many messages equal msg.
func (h *logRecorder) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range *h.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

// stop shuts the server down (like SIGTERM) and waits for Serve.
func (ts *tsrv) stop() {
	ts.once.Do(func() {
		ts.cancel()
		select {
		case <-ts.done:
		case <-time.After(15 * time.Second):
			panic("server did not stop within 15 s")
		}
	})
}

// proxyConf is the configuration of a test proxy: no background
// replication, no prefetch, no LRU deletion unless conf says otherwise
// (later lines win).
const proxyConf = "isProxy=true\nbackgroundReplication=false\nautoFreeDiskSpaceDelay=-1\nuplinkTimeout=3000\n"

// altServersFor writes an alt-servers file (INI) with the given uplinks.
func altServersFor(addrs ...string) string {
	var b strings.Builder
	for _, a := range addrs {
		b.WriteString("[" + a + "]\ncomment=uplink " + a + "\n\n")
	}
	return b.String()
}

// startProxy starts a proxy with an empty base path (or base) whose
// uplinks are addrs. limits is appended as a [limits] section.
func startProxy(t testing.TB, base, conf, limits string, hook func(*Server), addrs ...string) *tsrv {
	t.Helper()
	if base == "" {
		base = t.TempDir()
	}
	if limits == "" {
		limits = "maxPrefetch=0\n"
	}
	return runServer(t, base, proxyConf+conf+"[limits]\n"+limits, map[string]string{"alt-servers": altServersFor(addrs...)}, hook)
}

// genImage writes a generator image of size bytes with a .crc and
// returns its content padded to the virtual size.
func genImage(t testing.TB, base, name string, size int64, crc bool) []byte {
	t.Helper()
	path := filepath.Join(base, name)
	testutil.WriteGenImage(t, path, size)
	if crc {
		if _, err := WriteCRCFile(path); err != nil {
			t.Fatal(err)
		}
	}
	data := testutil.GenImage(0, size)
	return append(data, make([]byte, protocol.VirtualSize(size)-size)...)
}

// upRequest is a request the recorder saw.
type upRequest struct {
	conn int
	req  protocol.Request
	raw  []byte // header and payload
}

// recorder is a TCP relay in front of an upstream server that records
// the requests going up, can hold the replies going down and can tamper
// with GET_CRC32 replies.
type recorder struct {
	t      testing.TB
	ln     net.Listener
	target string

	mu     sync.Mutex
	reqs   []upRequest
	nconns int
	conns  []net.Conn

	gate   sync.RWMutex // held (Lock) by hold(): replies wait
	tamper bool         // flip a byte of GET_CRC32 payloads
	wg     sync.WaitGroup
}

func startRecorder(t testing.TB, target string) *recorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{t: t, ln: ln, target: target}
	r.wg.Add(1)
	go r.accept()
	t.Cleanup(r.close)
	return r
}

func (r *recorder) addr() string { return r.ln.Addr().String() }

func (r *recorder) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// dropConns closes every relayed connection (an upstream failure).
func (r *recorder) dropConns() {
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
	r.mu.Unlock()
}

func (r *recorder) hold()    { r.gate.Lock() }
func (r *recorder) release() { r.gate.Unlock() }

func (r *recorder) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.nconns++
		id := r.nconns
		r.conns = append(r.conns, c, u)
		r.mu.Unlock()
		r.wg.Add(2)
		go r.up(id, c, u)
		go r.down(c, u)
	}
}

// up copies requests from the proxy to the upstream server, recording them.
func (r *recorder) up(id int, c, u net.Conn) {
	defer r.wg.Done()
	defer u.Close()
	var hdr [protocol.RequestSize]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		req, err := protocol.ParseRequest(hdr[:])
		if err != nil {
			return
		}
		raw := append([]byte(nil), hdr[:]...)
		if req.Cmd != protocol.CmdGetBlock && req.Size > 0 {
			p := make([]byte, req.Size)
			if _, err := io.ReadFull(c, p); err != nil {
				return
			}
			raw = append(raw, p...)
		}
		r.mu.Lock()
		r.reqs = append(r.reqs, upRequest{conn: id, req: req, raw: raw})
		r.mu.Unlock()
		if _, err := u.Write(raw); err != nil {
			return
		}
	}
}

// down copies replies to the proxy, waiting while held.
func (r *recorder) down(c, u net.Conn) {
	defer r.wg.Done()
	defer c.Close()
	var hdr [protocol.ReplySize]byte
	buf := make([]byte, 256<<10)
	for {
		if _, err := io.ReadFull(u, hdr[:]); err != nil {
			return
		}
		rep, err := protocol.ParseReply(hdr[:])
		if err != nil {
			return
		}
		r.gate.RLock()
		r.gate.RUnlock()
		if _, err := c.Write(hdr[:]); err != nil {
			return
		}
		if rep.Cmd == protocol.CmdGetCRC32 && rep.Size > 0 {
			p := make([]byte, rep.Size)
			if _, err := io.ReadFull(u, p); err != nil {
				return
			}
			r.mu.Lock()
			if r.tamper {
				p[len(p)-1] ^= 0xff
			}
			r.mu.Unlock()
			if _, err := c.Write(p); err != nil {
				return
			}
			continue
		}
		if _, err := io.CopyBuffer(c, io.LimitReader(u, int64(rep.Size)), buf); err != nil {
			return
		}
	}
}

// blocks returns the GET_BLOCK requests with a hop count of at least 1
// (relayed, prefetch, replication; RTT probes of the client library have
// hop count 0).
func (r *recorder) blocks() []protocol.Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []protocol.Request
	for _, q := range r.reqs {
		if q.req.Cmd == protocol.CmdGetBlock && protocol.HopCount(q.req.Hops) >= 1 {
			out = append(out, q.req)
		}
	}
	return out
}

// blockBytes sums the sizes of blocks().
func (r *recorder) blockBytes() int64 {
	var n int64
	for _, q := range r.blocks() {
		n += int64(q.Size)
	}
	return n
}

// connRequests returns the raw requests of the recorder's n-th connection.
func (r *recorder) connRequests(n int) [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	for _, q := range r.reqs {
		if q.conn == n {
			out = append(out, q.raw)
		}
	}
	return out
}

// waitFor polls cond every 10 ms until it holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openClient opens an image on addr with the client library.
func openClient(t *testing.T, addr, name string, rid uint16, deadline time.Duration) *client.Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ci, err := client.Open(ctx, client.Config{Servers: []string{addr}, Image: name, RID: rid, NoProbe: true,
		Deadline: deadline, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ci.Close() })
	return ci
}

// getBlock sends a GET_BLOCK and returns the reply.
func getBlock(t *testing.T, c net.Conn, off uint64, size uint32, hops uint8, handle uint64) (protocol.Reply, []byte) {
	t.Helper()
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Offset: off, Size: size, Hops: hops, Handle: handle}, nil)
	return readReply(t, c)
}

// selectFlags performs a handshake with SELECT_IMAGE flags; ok is false
// if the server closed the connection instead of answering.
func selectFlags(t *testing.T, c net.Conn, name string, rid uint16, flags uint8) (protocol.SelectImageReply, bool) {
	t.Helper()
	selectRaw(t, c, protocol.SelectImage{Version: 3, Name: name, RID: rid, Flags: flags}.Marshal())
	var hdr [protocol.ReplySize]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return protocol.SelectImageReply{}, false
	}
	rep, err := protocol.ParseReply(hdr[:])
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, rep.Size)
	if _, err := io.ReadFull(c, p); err != nil {
		t.Fatal(err)
	}
	s, err := protocol.ParseSelectImageReply(p)
	if err != nil {
		t.Fatal(err)
	}
	return s, true
}

// loaded returns the proxy's image name:rid or fails.
func loaded(t *testing.T, s *Server, name string, rid uint16) *image {
	t.Helper()
	img := s.store.loaded(name, rid)
	if img == nil {
		t.Fatalf("%s:%d not loaded", name, rid)
	}
	return img
}

func fileSHA(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// queryJSON fetches /query and decodes it.
func queryJSON(t *testing.T, addr, q string, v any) []byte {
	t.Helper()
	code, _, body := httpGet(t, addr, "/query?"+q)
	if code != 200 {
		t.Fatalf("/query?%s: %d %s", q, code, body)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("%s: %v", body, err)
		}
	}
	return body
}

// expectRead checks a client library read against want.
func expectRead(t *testing.T, ci *client.Image, want []byte, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	if _, err := ci.ReadAt(buf, off); err != nil {
		t.Fatalf("read %d at %d: %v", n, off, err)
	}
	if !bytes.Equal(buf, want[off:off+n]) {
		t.Fatalf("read %d at %d: data differs", n, off)
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
