package mergertest

import (
	"crypto/x509"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Sizes of the merger's data model.
const (
	// maxBody is the largest request body accepted.
	maxBody = cowformat.BitfieldSize + cowformat.ClusterSize + 1<<16
)

// Server is a fake merger listening on a loopback address. Its methods
// are safe for concurrent use.
type Server struct {
	// URL is the base URL, "http://127.0.0.1:port" (https for NewTLS).
	URL string
	// Addr is "127.0.0.1:port", the form the reference client's -C takes.
	Addr string

	ts *httptest.Server

	mu          sync.Mutex
	sessions    map[string]*session
	order       []string
	requests    []Request
	faults      map[string][]*Fault // by endpoint name
	latency     time.Duration
	nextUUIDs   []string
	token       string
	updateHook  func(uuid string, cluster int)
	updatesNow  int
	maxUpdates  int
	requestsNow int
	maxRequests int
}

// New starts a fake merger on 127.0.0.1 with plain HTTP. Call Close when
// done.
func New() *Server {
	s := newServer()
	s.ts = httptest.NewServer(s)
	s.init()
	return s
}

// NewTLS starts a fake merger with HTTPS and a self-signed test
// certificate (see Certificate and Client).
func NewTLS() *Server {
	s := newServer()
	s.ts = httptest.NewUnstartedServer(s)
	// Clients that close idle connections early make the TLS server log
	// handshake errors; they are noise in tests.
	s.ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	s.ts.StartTLS()
	s.init()
	return s
}

// Start starts a fake merger (like New) that is closed when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s := New()
	tb.Cleanup(s.Close)
	return s
}

func newServer() *Server {
	return &Server{
		sessions: make(map[string]*session),
		faults:   make(map[string][]*Fault),
	}
}

func (s *Server) init() {
	s.URL = s.ts.URL
	u, _ := url.Parse(s.ts.URL)
	s.Addr = u.Host
}

// Close shuts the server down, closing open connections.
func (s *Server) Close() {
	s.ts.CloseClientConnections()
	s.ts.Close()
}

// Certificate returns the TLS server's certificate (nil for plain HTTP).
func (s *Server) Certificate() *x509.Certificate { return s.ts.Certificate() }

// Client returns an HTTP client that trusts the server's certificate.
func (s *Server) Client() *http.Client { return s.ts.Client() }

// RequireToken makes every request need "Authorization: Bearer <token>"
// (401 otherwise); "" turns the check off.
func (s *Server) RequireToken(token string) {
	s.mu.Lock()
	s.token = token
	s.mu.Unlock()
}

// SetLatency delays every reply by d (aborted if the client goes away).
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	s.latency = d
	s.mu.Unlock()
}

// SetUpdateHook sets a function called for every update request the
// server accepts, after it stored the upload and before it replies, with
// the session id and cluster index. Tests use it to change a cluster
// while its upload is in flight, or to look at files at that moment.
func (s *Server) SetUpdateHook(fn func(uuid string, cluster int)) {
	s.mu.Lock()
	s.updateHook = fn
	s.mu.Unlock()
}

// NextUUIDs makes the next create requests return these session ids, in
// order, instead of random GUIDs.
func (s *Server) NextUUIDs(ids ...string) {
	s.mu.Lock()
	s.nextUUIDs = append(s.nextUUIDs, ids...)
	s.mu.Unlock()
}

// MaxConcurrentUpdates is the largest number of update requests that were
// being handled at the same time.
func (s *Server) MaxConcurrentUpdates() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxUpdates
}

// MaxConcurrentRequests is the largest number of requests of any kind
// that were being handled at the same time.
func (s *Server) MaxConcurrentRequests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxRequests
}

// ResetConcurrency sets the maxima of MaxConcurrentUpdates and
// MaxConcurrentRequests back to 0.
func (s *Server) ResetConcurrency() {
	s.mu.Lock()
	s.maxUpdates, s.maxRequests = 0, 0
	s.mu.Unlock()
}

// ServeHTTP handles one request of the merger API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ep := endpoint(r.URL.Path)
	s.enter(ep)
	defer s.leave(ep)

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	rec := Request{
		Time:        start,
		Method:      r.Method,
		Path:        r.URL.Path,
		RawQuery:    r.URL.RawQuery,
		Query:       r.URL.Query(),
		ContentType: r.Header.Get("Content-Type"),
		Header:      r.Header.Clone(),
		Body:        body,
		Endpoint:    ep,
	}
	var rep reply
	switch {
	case err != nil:
		rep = reply{status: http.StatusRequestEntityTooLarge, body: "request body too large"}
	case !s.authorized(r):
		rep = reply{status: http.StatusUnauthorized, body: "missing or wrong bearer token"}
	default:
		rep = s.handle(r, ep, body)
	}
	if !s.wait(r) {
		rep = reply{status: http.StatusServiceUnavailable, body: "client went away"}
	}
	rec.Status = rep.status
	s.mu.Lock()
	s.requests = append(s.requests, rec)
	s.mu.Unlock()
	rep.write(w)
}

// endpoint names the API call of a path, matched case-insensitively:
// "create", "update", "merge", "status", or "" for anything else.
func endpoint(path string) string {
	p := strings.ToLower(strings.TrimRight(path, "/"))
	switch p {
	case "/v1/file/create":
		return "create"
	case "/v1/file/update":
		return "update"
	case "/v1/file/merge":
		return "merge"
	case "/v1/file/status":
		return "status"
	}
	return ""
}

// enter and leave count requests in progress.
func (s *Server) enter(ep string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requestsNow++
	s.maxRequests = max(s.maxRequests, s.requestsNow)
	if ep == "update" {
		s.updatesNow++
		s.maxUpdates = max(s.maxUpdates, s.updatesNow)
	}
}

func (s *Server) leave(ep string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requestsNow--
	if ep == "update" {
		s.updatesNow--
	}
}

// authorized checks the bearer token if one is required.
func (s *Server) authorized(r *http.Request) bool {
	s.mu.Lock()
	tok := s.token
	s.mu.Unlock()
	return tok == "" || r.Header.Get("Authorization") == "Bearer "+tok
}

// wait applies the configured latency; false if the client went away.
func (s *Server) wait(r *http.Request) bool {
	s.mu.Lock()
	d := s.latency
	s.mu.Unlock()
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

// reply is a response to write.
type reply struct {
	status      int
	contentType string
	body        string
	header      map[string]string
}

func (rep reply) write(w http.ResponseWriter) {
	ct := rep.contentType
	if ct == "" {
		ct = "text/plain; charset=utf-8"
	}
	w.Header().Set("Content-Type", ct)
	for k, v := range rep.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(rep.status)
	io.WriteString(w, rep.body)
}
