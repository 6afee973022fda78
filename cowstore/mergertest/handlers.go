package mergertest

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/bits"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/uuid"
)

// handle dispatches a request whose body has been read.
func (s *Server) handle(r *http.Request, ep string, body []byte) reply {
	want := http.MethodPost
	if ep == "status" {
		want = http.MethodGet
	}
	switch {
	case ep == "":
		return reply{status: http.StatusNotFound, body: "no such endpoint"}
	case r.Method != want:
		return reply{status: http.StatusMethodNotAllowed, body: "use " + want, header: map[string]string{"Allow": want}}
	}
	if f, ok := s.takeFault(ep); ok {
		return f.reply()
	}
	switch ep {
	case "create":
		return s.create(r, body)
	case "update":
		return s.update(r, body)
	case "merge":
		return s.merge(r, body)
	default:
		return s.status(r)
	}
}

// badRequest is a 400 reply.
func badRequest(msg string) reply { return reply{status: http.StatusBadRequest, body: msg} }

// sessionNotFound is the reply for an unknown session id.
func sessionNotFound() reply { return reply{status: http.StatusNotFound, body: "Session not found"} }

// lookup returns the first value of key, compared case-insensitively.
func lookup(v url.Values, key string) (string, bool) {
	for k, vs := range v {
		if strings.EqualFold(k, key) && len(vs) > 0 {
			return vs[0], true
		}
	}
	return "", false
}

// parseForm decodes an urlencoded or multipart form body.
func parseForm(r *http.Request, body []byte) (url.Values, error) {
	ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || (ct != "application/x-www-form-urlencoded" && ct != "multipart/form-data") {
		return nil, errors.New("want a form (application/x-www-form-urlencoded or multipart/form-data)")
	}
	r2 := r.Clone(r.Context())
	r2.Body = io.NopCloser(bytes.NewReader(body))
	r2.Form, r2.PostForm, r2.MultipartForm = nil, nil, nil
	if err := r2.ParseMultipartForm(1 << 20); err != nil && !errors.Is(err, http.ErrNotMultipart) {
		return nil, err
	}
	return r2.PostForm, nil
}

// intField reads a required integer form or query field.
func intField(v url.Values, key string, bitSize int) (int64, error) {
	s, ok := lookup(v, key)
	if !ok {
		return 0, errors.New("missing field " + key)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, bitSize)
	if err != nil {
		return 0, errors.New("field " + key + " is not an integer")
	}
	return n, nil
}

// create handles POST /v1/file/create.
func (s *Server) create(r *http.Request, body []byte) reply {
	form, err := parseForm(r, body)
	if err != nil {
		return reply{status: http.StatusUnsupportedMediaType, body: err.Error()}
	}
	rev, err := intField(form, "revision", 32)
	if err != nil {
		return badRequest(err.Error())
	}
	bfs, err := intField(form, "bitfieldSize", 32)
	if err != nil {
		return badRequest(err.Error())
	}
	name, _ := lookup(form, "imageName")
	switch {
	case rev < 0 || rev > math.MaxUint16:
		return badRequest("revision out of range")
	case bfs != cowformat.BitfieldSize:
		return badRequest("bitfieldSize must be 40")
	case name == "":
		return badRequest("missing field imageName")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := uuid.New()
	if len(s.nextUUIDs) > 0 {
		id, s.nextUUIDs = s.nextUUIDs[0], s.nextUUIDs[1:]
	}
	s.addSessionLocked(id, name, int(rev))
	return reply{status: http.StatusOK, body: id}
}

// update handles POST /v1/file/update?uuid=&clusterindex=.
func (s *Server) update(r *http.Request, body []byte) reply {
	q := r.URL.Query()
	id, _ := lookup(q, "uuid")
	idx, err := intField(q, "clusterindex", 32)
	switch {
	case id == "":
		return badRequest("missing query parameter uuid")
	case err != nil:
		return badRequest(err.Error())
	case idx < 0:
		return badRequest("negative clusterindex")
	}
	if ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || ct != "application/octet-stream" {
		return reply{status: http.StatusUnsupportedMediaType, body: "Content-Type must be application/octet-stream"}
	}
	if len(body) < cowformat.BitfieldSize {
		return badRequest("body shorter than the 40-byte bitfield")
	}
	var c Cluster
	copy(c.Bitfield[:], body)
	n := 0
	for _, b := range c.Bitfield {
		n += bits.OnesCount8(b)
	}
	if len(body) != cowformat.BitfieldSize+n*cowformat.BlockSize {
		return badRequest("body is " + strconv.Itoa(len(body)) + " bytes, want 40 + 4096 x " + strconv.Itoa(n) + " set bits = " + strconv.Itoa(cowformat.BitfieldSize+n*cowformat.BlockSize))
	}
	c.Blocks = bytes.Clone(body[cowformat.BitfieldSize:])

	s.mu.Lock()
	sess, ok := s.sessions[id]
	switch {
	case !ok:
		s.mu.Unlock()
		return sessionNotFound()
	case len(sess.Merges) > 0:
		s.mu.Unlock()
		return reply{status: http.StatusConflict, body: "session already merged"}
	}
	if old := sess.clusters[int(idx)]; old != nil {
		c.Uploads = old.Uploads
	}
	c.Uploads++
	sess.clusters[int(idx)] = &c
	sess.Updates++
	hook := s.updateHook
	s.mu.Unlock()
	if hook != nil {
		hook(id, int(idx))
	}
	return reply{status: http.StatusOK}
}

// merge handles POST /v1/file/merge.
func (s *Server) merge(r *http.Request, body []byte) reply {
	form, err := parseForm(r, body)
	if err != nil {
		return reply{status: http.StatusUnsupportedMediaType, body: err.Error()}
	}
	id, _ := lookup(form, "uuid")
	orig, err1 := intField(form, "originalFileSize", 64)
	size, err2 := intField(form, "newFileSize", 64)
	switch {
	case id == "":
		return badRequest("missing field uuid")
	case err1 != nil:
		return badRequest(err1.Error())
	case err2 != nil:
		return badRequest(err2.Error())
	case orig < 0 || size < 0:
		return badRequest("negative size")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[id]
	if !ok {
		return sessionNotFound()
	}
	sess.Merges = append(sess.Merges, Merge{OriginalFileSize: orig, NewFileSize: size, Time: time.Now()})
	return reply{status: http.StatusOK, body: "Merge started"}
}

// statusJSON is the reply of GET /v1/file/status.
type statusJSON struct {
	ImageName            string `json:"imageName"`
	MergedClusters       int    `json:"mergedClusters"`
	NewImageVersion      int    `json:"newImageVersion"`
	OriginalImageVersion int    `json:"originalImageVersion"`
	State                string `json:"state"`
	TotalClusters        int    `json:"totalClusters"`
}

// status handles GET /v1/file/status?uuid=. A merged session reports
// state Done with all clusters merged and revision+1 as the new version.
func (s *Server) status(r *http.Request) reply {
	id, _ := lookup(r.URL.Query(), "uuid")
	if id == "" {
		return badRequest("missing query parameter uuid")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[id]
	if !ok {
		return sessionNotFound()
	}
	st := statusJSON{
		ImageName:            sess.ImageName,
		NewImageVersion:      -1,
		OriginalImageVersion: sess.Revision,
		State:                "Active",
		TotalClusters:        len(sess.clusters),
	}
	if len(sess.Merges) > 0 {
		st.State, st.MergedClusters, st.NewImageVersion = "Done", len(sess.clusters), sess.Revision+1
	}
	b, _ := json.Marshal(st)
	return reply{status: http.StatusOK, contentType: "application/json; charset=utf-8", body: string(b)}
}
