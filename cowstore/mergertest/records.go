package mergertest

import (
	"bytes"
	"net/http"
	"net/url"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Request is a recorded request.
type Request struct {
	// Time is when the request arrived.
	Time time.Time
	// Method, Path and RawQuery are as received; Query is RawQuery parsed.
	Method   string
	Path     string
	RawQuery string
	Query    url.Values
	// ContentType is the Content-Type header; Header holds all headers.
	ContentType string
	Header      http.Header
	// Body is the whole request body.
	Body []byte
	// Endpoint is "create", "update", "merge", "status" or "".
	Endpoint string
	// Status is the status the server replied with.
	Status int
}

// Session is a snapshot of a merger session.
type Session struct {
	UUID         string
	ImageName    string
	Revision     int
	BitfieldSize int
	Created      time.Time
	// Clusters holds the latest upload of every cluster index.
	Clusters map[int]Cluster
	// Updates counts the accepted update requests.
	Updates int
	// Merges lists the accepted merge requests, oldest first.
	Merges []Merge
}

// Cluster is the stored state of one cluster: the bitfield and blocks of
// its latest upload.
type Cluster struct {
	Bitfield [cowformat.BitfieldSize]byte
	// Blocks holds 4096 bytes for every set bit, ascending.
	Blocks []byte
	// Uploads counts the accepted uploads of this cluster.
	Uploads int
}

// Merge is an accepted merge request.
type Merge struct {
	OriginalFileSize int64
	NewFileSize      int64
	Time             time.Time
}

// session is the server's state of a session.
type session struct {
	Session
	clusters map[int]*Cluster
}

// snapshot copies a session for callers.
func (s *session) snapshot() Session {
	out := s.Session
	out.Merges = append([]Merge(nil), s.Merges...)
	out.Clusters = make(map[int]Cluster, len(s.clusters))
	for i, c := range s.clusters {
		cc := *c
		cc.Blocks = bytes.Clone(c.Blocks)
		out.Clusters[i] = cc
	}
	return out
}

// Requests returns all recorded requests in the order they were answered.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// RequestsTo returns the recorded requests to one endpoint ("create",
// "update", "merge", "status").
func (s *Server) RequestsTo(endpoint string) []Request {
	var out []Request
	for _, r := range s.Requests() {
		if r.Endpoint == endpoint {
			out = append(out, r)
		}
	}
	return out
}

// Sessions returns the ids of all sessions, in creation order.
func (s *Server) Sessions() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.order...)
}

// Session returns a snapshot of a session.
func (s *Server) Session(uuid string) (Session, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[uuid]
	if !ok {
		return Session{}, false
	}
	return sess.snapshot(), true
}

// AddSession registers a session as if it had been created (for a client
// that reuses an id with --upload-uuid).
func (s *Server) AddSession(uuid, imageName string, revision int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sessions[uuid]; ok {
		return
	}
	s.addSessionLocked(uuid, imageName, revision)
}

// addSessionLocked registers a new session; the caller holds s.mu.
func (s *Server) addSessionLocked(uuid, imageName string, revision int) {
	s.sessions[uuid] = &session{
		Session:  Session{UUID: uuid, ImageName: imageName, Revision: revision, BitfieldSize: cowformat.BitfieldSize, Created: time.Now()},
		clusters: make(map[int]*Cluster),
	}
	s.order = append(s.order, uuid)
}
