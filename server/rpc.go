package server

import (
	"context"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/internal/statusui"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// HTTP connection limits of the reference: above softHTTPClients the server
// closes after each response, above maxHTTPClients it answers 503. Unlike
// the reference, one source (an IPv4 address or an IPv6 /64) gets at most
// maxHTTPClientsPerSource of the slots, so a client that opens connections
// and never finishes its request cannot lock everyone else out.
const (
	softHTTPClients         = 40
	maxHTTPClients          = 50
	maxHTTPClientsPerSource = 8
	logfileTail             = 4000
	maxQueryItems           = 10
)

// rpcServer answers the HTTP JSON RPC (/query, /cachemap) on connections
// the protocol detector handed over.
type rpcServer struct {
	srv    *Server
	ln     *handoffListener
	http   *http.Server
	active atomic.Int32

	slotMu   sync.Mutex
	bySource map[netip.Prefix]int // RPC connections per source

	metricsHandler http.Handler            // /metrics (metrics_http.go)
	page           *statusui.Page          // the status page's files (statuspage.go)
	counted        map[string]http.Handler // route, counted, by rpcPaths label (metrics_http.go)
}

func newRPCServer(s *Server) *rpcServer {
	r := &rpcServer{srv: s, ln: newHandoffListener(), bySource: map[netip.Prefix]int{}}
	reg, rpcReqs := newMetrics(s)
	r.metricsHandler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
	r.counted = countedRoutes(rpcReqs, http.HandlerFunc(r.route))
	r.page = newStatusPage()
	timeout := s.config().ClientTimeout
	r.http = &http.Server{
		Handler:           r,
		ReadHeaderTimeout: timeout,
		ReadTimeout:       timeout,
		WriteTimeout:      timeout,
		IdleTimeout:       4 * timeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          log.New(slogWriter{s.log}, "", 0),
	}
	return r
}

func (r *rpcServer) serve() { r.http.Serve(r.ln) }

func (r *rpcServer) close() {
	r.ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r.http.Shutdown(ctx)
}

// handoff passes an HTTP connection (whose first bytes were already read)
// to the HTTP server. done runs when the connection is closed.
func (r *rpcServer) handoff(c net.Conn, prefix []byte, done func()) bool {
	src := rpcSource(addrPort(c.RemoteAddr()).Addr())
	if !r.takeSlot(src) {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write([]byte("HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"))
		return false
	}
	pc := &prefixConn{Conn: c, prefix: append([]byte(nil), prefix...), onClose: func() {
		r.releaseSlot(src)
		done()
	}}
	if !r.ln.put(pc) {
		r.releaseSlot(src)
		return false
	}
	return true
}

// rpcSource is the unit the per-source slot limit counts: the IPv4
// address, or the /64 of an IPv6 address (one host usually owns a whole
// /64).
func rpcSource(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := a.BitLen()
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// takeSlot reserves an RPC connection slot for src; false if all slots
// or all of src's share are taken.
func (r *rpcServer) takeSlot(src netip.Prefix) bool {
	r.slotMu.Lock()
	defer r.slotMu.Unlock()
	if r.active.Load() >= maxHTTPClients || r.bySource[src] >= maxHTTPClientsPerSource {
		return false
	}
	r.active.Add(1)
	r.bySource[src]++
	return true
}

// releaseSlot returns a slot takeSlot gave src.
func (r *rpcServer) releaseSlot(src netip.Prefix) {
	r.slotMu.Lock()
	defer r.slotMu.Unlock()
	r.active.Add(-1)
	if r.bySource[src]--; r.bySource[src] <= 0 {
		delete(r.bySource, src)
	}
}

// ServeHTTP routes /query, /cachemap, /metrics and the status page, and
// counts the request by path and status.
func (r *rpcServer) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	label, ok := rpcPaths[req.URL.Path]
	if !ok {
		label = "other"
	}
	r.counted[label].ServeHTTP(w, req)
}

func (r *rpcServer) route(w http.ResponseWriter, req *http.Request) {
	if r.active.Load() > softHTTPClients || req.Close {
		w.Header().Set("Connection", "Close")
	} else {
		w.Header().Set("Connection", "Keep-Alive")
	}
	var perm aclPerm
	if ap, err := netip.ParseAddrPort(req.RemoteAddr); err == nil {
		perm = r.srv.acl.allowed(ap.Addr().Unmap())
	}
	switch req.URL.Path {
	case "/query":
		r.query(w, req, perm)
	case "/cachemap":
		r.cachemap(w, req, perm)
	case "/metrics":
		r.metrics(w, req, perm)
	case "/", "/status.js", "/status.css":
		r.statusPage(w, req, perm)
	case "/status.json":
		r.statusJSON(w, req, perm)
	case "/status/map":
		r.statusMap(w, req, perm)
	default:
		textReply(w, http.StatusNotFound, "Nothing")
	}
}

func textReply(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(msg)))
	w.WriteHeader(code)
	w.Write([]byte(msg))
}

// queryItem describes one q= value: the permission it needs, the text of
// the 403 answer and the writer of its keys.
type queryItem struct {
	perm   aclPerm
	denied string
	write  func(s *Server, o *jsonObject)
}

var queryItems = map[string]queryItem{
	"stats":      {permStats, "No permission to access statistics", writeStats},
	"space":      {permStats, "No permission to access statistics", writeSpace},
	"version":    {permStats, "No permission to access statistics", writeVersion},
	"clients":    {permClientList, "No permission to access client list", writeClients},
	"images":     {permImageList, "No permission to access image list", writeImages},
	"config":     {permAll, "No permission to access config", writeConfig},
	"altservers": {permAll, "No permission to access alt servers", writeAltServers},
	"logfile":    {permAll, "No permission to access log file", writeLogfile},
}

// queryOrder is the reference's fixed order of the answer's keys; runId
// is always there.
var queryOrder = []string{"stats", "runId", "version", "space", "config", "logfile", "clients", "images", "altservers"}

// query answers /query?q=A&q=B (and, unlike the reference, q=A,B). Keys
// come in the reference's fixed order whatever order q lists them in.
func (r *rpcServer) query(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	want, denied := wantedItems(req.URL.Query()["q"], perm)
	if denied != "" {
		textReply(w, http.StatusForbidden, denied)
		return
	}
	s := r.srv
	o := newJSONObject()
	for _, k := range queryOrder {
		switch {
		case k == "runId":
			o.uint("runId", s.runID)
		case want[k]:
			queryItems[k].write(s, o)
		}
	}
	body := o.bytes()
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

// wantedItems returns the known items the q= values list (at most
// maxQueryItems are looked at), or the 403 text of the first one perm does
// not allow.
func wantedItems(qs []string, perm aclPerm) (want map[string]bool, denied string) {
	want = map[string]bool{}
	n := 0
	for _, v := range qs {
		for _, item := range strings.Split(v, ",") {
			item = strings.TrimSpace(item)
			if n >= maxQueryItems {
				break
			}
			n++
			qi, ok := queryItems[item]
			if !ok {
				continue
			}
			if !perm.has(qi.perm) {
				return nil, qi.denied
			}
			want[item] = true
		}
	}
	return want, ""
}

func writeStats(s *Server, o *jsonObject) {
	clients, servers := s.peerCounts()
	o.uint("bytesReceived", s.bytesRecv.Load())
	o.uint("bytesSent", s.bytesSent.Load())
	o.int("clientCount", int64(clients))
	o.int("serverCount", int64(servers))
	o.int("uptime", int64(time.Since(s.started)/time.Second))
	putReused(o, s.bytesReused.Load())
}

func writeVersion(s *Server, o *jsonObject) {
	o.str("version", s.opts.Version)
	o.str("build", "Release")
}

func writeSpace(s *Server, o *jsonObject) {
	free, total, _ := fsutil.DiskSpace(s.config().BasePath) // zeros on error
	o.uint("spaceTotal", uint64(total))
	o.uint("spaceFree", uint64(free))
}

func writeConfig(s *Server, o *jsonObject) { o.str("config", s.config().String()) }

func writeLogfile(s *Server, o *jsonObject) {
	if s.opts.LogTail == nil {
		o.null("logfile")
	} else {
		o.str("logfile", string(s.opts.LogTail(logfileTail)))
	}
}

func writeClients(s *Server, o *jsonObject) {
	var items [][]byte
	for _, cc := range s.clientList() {
		c := newJSONObject()
		c.str("address", cc.addr.String())
		c.int("imageId", int64(cc.img.ID))
		c.int("isServer", b2i(cc.isServer.Load()))
		c.uint("bytesSent", cc.bytesSent.Load())
		items = append(items, c.bytes())
	}
	items = append(items, s.iscsiClients()...)
	o.raw("clients", jsonArray(items))
}

func writeImages(s *Server, o *jsonObject) {
	var items [][]byte
	for _, img := range s.store.list() {
		items = append(items, imageJSON(img))
	}
	o.raw("images", jsonArray(items))
}

func writeAltServers(s *Server, o *jsonObject) {
	var items [][]byte
	for _, a := range s.alts {
		items = append(items, altServerJSON(a))
	}
	o.raw("altservers", jsonArray(items))
}

func imageJSON(img *image) []byte {
	o := newJSONObject()
	o.int("id", int64(img.ID))
	o.str("name", img.Name)
	o.uint("wwn", img.WWN)
	o.int("rid", int64(img.RID))
	o.int("users", int64(img.Users()))
	o.int("complete", int64(img.complete()))
	o.int("idle", int64(img.idle()/time.Second))
	o.int("size", img.VirtualSize)
	o.uint("problems", uint64(img.Problems()))
	if up := img.up.Load(); up != nil {
		// only while an uplink exists, as the reference does
		o.uint("bytesReceived", img.bytesRecv.Load())
		o.str("uplinkServer", up.server())
	}
	putReused(o, img.bytesReused.Load())
	return o.bytes()
}

func altServerJSON(a *altServer) []byte {
	snap := a.snapshot()
	o := newJSONObject()
	o.str("comment", a.Comment)
	o.str("host", formatHost(a.Addr))
	rtt := make([][]byte, len(snap.RTT))
	for i, v := range snap.RTT {
		rtt[i] = strconv.AppendUint(nil, uint64(v), 10)
	}
	o.raw("rtt", jsonArray(rtt))
	o.bool("isPrivate", a.Private)
	o.bool("isClientOnly", a.ClientOnly)
	o.int("numFails", int64(snap.Fails))
	return o.bytes()
}

// cachemap answers /cachemap?id=N with the image's cache map, or the single
// byte 0xFF for a complete image.
func (r *rpcServer) cachemap(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.has(permImageList) {
		textReply(w, http.StatusForbidden, "No permission to access image list")
		return
	}
	v := req.URL.Query().Get("id")
	if v == "" {
		textReply(w, http.StatusBadRequest, "Missing parameter 'id'")
		return
	}
	id, err := strconv.Atoi(v)
	img := r.srv.store.byID(id)
	if err != nil || img == nil {
		textReply(w, http.StatusNotFound, "Image not found")
		return
	}
	body := img.cacheMap()
	w.Header().Set("Content-Type", "application/octet-stream; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// slogWriter routes net/http's internal error log to slog at debug level.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Debug("rpc: " + strings.TrimSpace(string(p)))
	return len(p), nil
}
