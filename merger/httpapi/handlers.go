package httpapi

import (
	"fmt"
	"net/http"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/merger"
)

// Merge replies. The client treats any 2xx as accepted, and repeats the
// request up to 6 times, so repeats are answered 200 as well.
const (
	textMergeStarted    = "Merge started"
	textMergeInProgress = "Merge in progress"
	textMergeDone       = "Merge done"
)

// query decodes the request's query string (400 if malformed).
func query(r *http.Request) (values, error) {
	q, err := parseURLEncoded(r.URL.RawQuery)
	if err != nil {
		return nil, &httpError{status: http.StatusBadRequest, msg: "query string: " + err.Error()}
	}
	return q, nil
}

// create handles POST Create: form imageName, revision (seed: version),
// bitfieldSize. It answers 200 text/plain with the bare session GUID (36
// characters, no quotes, no newline: dnbd3-fuse rejects longer replies).
func (h *handler) create(g *generation, w http.ResponseWriter, r *http.Request) error {
	form, err := readForm(w, r)
	if err != nil {
		return err
	}
	b := binder{src: form}
	name := b.str("imageName")
	rev := b.int32(g.revisionKey, 0)
	bfs := b.int32("bitfieldSize", 0)
	if err := b.err(); err != nil {
		return err
	}
	info, err := h.svc.Create(name, rev, bfs)
	if err != nil {
		return &opError{fmt.Sprintf("create a session for %q r%d", name, rev), err}
	}
	if info.UUID == "" || len(info.UUID) > 36 {
		return fmt.Errorf("httpapi: create a session for %q r%d: the service returned the unusable session id %q", name, rev, info.UUID)
	}
	h.log.Info("session created", "api", g.name, "uuid", info.UUID, "image", name, "revision", rev, "remote", r.RemoteAddr)
	writeText(w, http.StatusOK, info.UUID)
	return nil
}

// update handles POST Update?uuid=&clusterindex= (seed: guid, blockNumber):
// an application/octet-stream body with the 40-byte bitfield, then either
// the 4 KiB blocks whose bit is set (v1 only) or the whole cluster. It
// answers 200 with an empty body once the Service has stored the cluster.
//
// Nothing is buffered before the session is known to accept uploads and
// the upload is admitted (see uploads.go); the body must then arrive
// within the upload timeout.
func (h *handler) update(g *generation, w http.ResponseWriter, r *http.Request) error {
	if err := checkOctetStream(r); err != nil {
		return err
	}
	q, err := query(r)
	if err != nil {
		return err
	}
	b := binder{src: q}
	id := b.guid(g.uuidKey)
	idx := b.int32(g.clusterKey, 0)
	if err := b.err(); err != nil {
		return err
	}
	if err := h.svc.CanUpload(id); err != nil {
		return &opError{fmt.Sprintf("update session %s cluster %d", id, idx), err}
	}
	buf, release, err := h.uploads.acquire(r.Context(), sourceOf(r.RemoteAddr))
	if err != nil {
		return err
	}
	defer release()
	rc := http.NewResponseController(w)
	// Not every ResponseWriter has deadlines (ErrNotSupported): then the
	// server's own timeouts are all there is.
	_ = rc.SetReadDeadline(time.Now().Add(h.uploadTimeout))
	body, err := readUpdateBody(w, r, buf)
	_ = rc.SetReadDeadline(time.Time{}) // the next request gets the server's
	if err != nil {
		return err
	}
	if len(body) < cowformat.BitfieldSize {
		return &httpError{status: http.StatusBadRequest,
			msg: fmt.Sprintf("the update body is %d bytes, shorter than the %d-byte bitfield", len(body), cowformat.BitfieldSize)}
	}
	u := merger.Update{Cluster: idx, Blocks: body[cowformat.BitfieldSize:]}
	copy(u.Bitfield[:], body)
	u.Full = len(u.Blocks) >= cowformat.ClusterSize
	if g.fullOnly && !u.Full {
		return &httpError{status: http.StatusBadRequest,
			msg: fmt.Sprintf("the update body is %d bytes: this API wants the %d-byte bitfield and the full %d-byte cluster (sparse updates: use /v1/File/Update)", len(body), cowformat.BitfieldSize, cowformat.ClusterSize)}
	}
	if err := h.svc.Update(id, u); err != nil {
		return &opError{fmt.Sprintf("update session %s cluster %d", id, idx), err}
	}
	h.met.ingest.Add(float64(len(body)))
	w.WriteHeader(http.StatusOK)
	return nil
}

// merge handles POST Merge (seed: StartMerge): form uuid (seed: guid),
// originalFileSize, newFileSize. The merge runs in the background; the
// reply is 200 "Merge started", or for a repeated request "Merge in
// progress" or "Merge done". A session whose merge failed (and that the
// Service does not merge again) gives 409 with the reason.
func (h *handler) merge(g *generation, w http.ResponseWriter, r *http.Request) error {
	form, err := readForm(w, r)
	if err != nil {
		return err
	}
	b := binder{src: form}
	id := b.guid(g.uuidKey)
	orig := b.int64("originalFileSize", 0)
	size := b.int64("newFileSize", 0)
	if err := b.err(); err != nil {
		return err
	}
	// The state before the request tells a new merge from a repeat.
	before, beforeErr := h.svc.Status(id)
	info, err := h.svc.Merge(id, orig, size)
	if err != nil {
		return &opError{"merge session " + id, err}
	}
	var msg string
	switch {
	case info.State == merger.StateDone:
		msg = textMergeDone
	case info.State == merger.StateFailed:
		return &httpError{status: http.StatusConflict, msg: "Merge failed: " + info.Error}
	case beforeErr == nil && (before.State == merger.StateCopying || before.State == merger.StateMerging):
		msg = textMergeInProgress
	default:
		msg = textMergeStarted
		h.log.Info("merge requested", "api", g.name, "uuid", id, "image", info.ImageName,
			"revision", info.OriginalRevision, "originalFileSize", orig, "newFileSize", size, "remote", r.RemoteAddr)
	}
	writeText(w, http.StatusOK, msg)
	return nil
}

// topModified handles GET GetTopModifiedBlocks?uuid=&amount= (seed: guid):
// up to amount clusters with the most uploads, as JSON, or 204 for a
// merged (Done) session, like the reference.
func (h *handler) topModified(g *generation, w http.ResponseWriter, r *http.Request) error {
	q, err := query(r)
	if err != nil {
		return err
	}
	b := binder{src: q}
	id := b.guid(g.uuidKey)
	n := b.int32("amount", 0)
	if err := b.err(); err != nil {
		return err
	}
	info, err := h.svc.Status(id)
	if err != nil {
		return &opError{"statistics of session " + id, err}
	}
	if info.State == merger.StateDone {
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	cs, err := h.svc.TopModified(id, n)
	if err != nil {
		return &opError{"statistics of session " + id, err}
	}
	writeJSON(w, http.StatusOK, typeJSON, g.topReply(cs))
	return nil
}

// status handles GET Status?uuid= (seed: guid): the session's state as
// JSON, reported truthfully.
func (h *handler) status(g *generation, w http.ResponseWriter, r *http.Request) error {
	q, err := query(r)
	if err != nil {
		return err
	}
	b := binder{src: q}
	id := b.guid(g.uuidKey)
	if err := b.err(); err != nil {
		return err
	}
	info, err := h.svc.Status(id)
	if err != nil {
		return &opError{"status of session " + id, err}
	}
	writeJSON(w, http.StatusOK, typeJSON, g.statusReply(info))
	return nil
}
