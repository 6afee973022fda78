package httpapi

// Routes besides the REST API: /metrics (Options.Metrics) and the status
// page (Options.StatusPage): GET / with its script and style, and
// /status.json. The page needs the token like the API; a browser sends it
// as the password of HTTP Basic authentication (any user name), tools as
// "Authorization: Bearer <token>".

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/statusui"
	"github.com/dnbd3go/dnbd3go/merger"
)

var (
	//go:embed statusui/main.html
	statusMain []byte
	//go:embed statusui/status.js
	statusJS []byte
	//go:embed statusui/merger.css
	statusCSS []byte
)

// newStatusPage assembles the page's files (once, in New).
func newStatusPage() *statusui.Page {
	return statusui.NewPage("dnbd3-merger", statusMain, statusJS, statusCSS)
}

// sessionLister is what the status page needs from the Service
// (*merger.Manager has it).
type sessionLister interface {
	Sessions() []merger.SessionInfo
}

// serveExtra serves /metrics and the status page; false for every other
// path (the REST API).
func (h *handler) serveExtra(w http.ResponseWriter, r *http.Request) bool {
	path := r.URL.Path
	switch {
	case path == "/metrics" && h.metrics != nil:
		if h.openMetrics || h.pageAuth(w, r) {
			h.metrics.ServeHTTP(w, r)
		}
	case h.page != nil && (h.page.Has(path) || path == "/status.json"):
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", http.MethodGet)
			writeText(w, http.StatusMethodNotAllowed, "Method not allowed: use GET")
		} else if h.pageAuth(w, r) {
			h.servePage(w, r)
		}
	default:
		return false
	}
	return true
}

// pageAuth checks the token (Bearer, or Basic with the token as the
// password); without one it answers 401 with a Basic challenge, so that
// a browser asks for it.
func (h *handler) pageAuth(w http.ResponseWriter, r *http.Request) bool {
	if h.auth == nil {
		return true
	}
	if _, pw, ok := r.BasicAuth(); ok && h.auth.matches(pw) {
		return true
	}
	if tok, ok := bearerToken(r.Header.Get("Authorization")); ok && h.auth.matches(tok) {
		return true
	}
	w.Header().Set("WWW-Authenticate", `Basic realm="dnbd3-merger (password: the token)", charset="UTF-8"`)
	writeText(w, http.StatusUnauthorized, "Unauthorized: the status page needs the token (as the password)")
	return false
}

// pageDoc is /status.json.
type pageDoc struct {
	Version  string               `json:"version"`
	Uptime   int64                `json:"uptimeSeconds"`
	Sessions []merger.SessionInfo `json:"sessions"`
}

// servePage answers the page's files and /status.json.
func (h *handler) servePage(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Cache-Control", "no-store")
	hd.Set("X-Content-Type-Options", "nosniff")
	if r.URL.Path == "/status.json" {
		doc := pageDoc{Version: h.version, Uptime: int64(time.Since(h.started) / time.Second), Sessions: []merger.SessionInfo{}}
		if l, ok := h.svc.(sessionLister); ok {
			doc.Sessions = append(doc.Sessions, l.Sessions()...)
		}
		body, err := json.Marshal(doc)
		if err != nil {
			writeText(w, http.StatusInternalServerError, err.Error())
			return
		}
		hd.Set("Content-Type", "application/json; charset=utf-8")
		hd.Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
		return
	}
	h.page.Serve(w, r.URL.Path)
}
