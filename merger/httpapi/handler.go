package httpapi

import (
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/dnbd3go/dnbd3go/merger"
)

// Options configure the handler New returns.
type Options struct {
	// Token, if not empty, is the bearer token every request must carry
	// ("Authorization: Bearer <Token>"); requests without it get 401.
	Token string
	// Logger receives a Debug line per request and the errors;
	// nil means slog.Default().
	Logger *slog.Logger
}

// handler is the http.Handler New returns.
type handler struct {
	svc    merger.Service
	log    *slog.Logger
	auth   *bearerAuth // nil without a token
	routes map[string]route
}

// New returns the HTTP API of both generations for svc.
func New(svc merger.Service, opts Options) http.Handler {
	h := &handler{
		svc:  svc,
		log:  opts.Logger,
		auth: newBearerAuth(opts.Token),
	}
	if h.log == nil {
		h.log = slog.Default()
	}
	h.routes = buildRoutes(v1API, seedAPI)
	return h
}

// ServeHTTP authenticates the request, finds its route and runs it,
// logging the outcome.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w}
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.Error("panic while handling a request", "method", r.Method, "path", r.URL.Path,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			if !rec.wroteHeader {
				writeText(rec, http.StatusInternalServerError, "Internal server error")
			}
		}
		h.log.Debug("request", "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery,
			"status", rec.status(), "bytes", rec.written, "duration", time.Since(start), "remote", r.RemoteAddr)
	}()
	if h.auth != nil && !h.auth.check(rec, r, h.log) {
		return
	}
	rt, ok := h.lookup(r.URL.Path)
	switch {
	case !ok:
		writeText(rec, http.StatusNotFound, "Not found")
		return
	case rt.method != r.Method:
		rec.Header().Set("Allow", rt.method)
		writeText(rec, http.StatusMethodNotAllowed, "Method not allowed: use "+rt.method)
		return
	}
	if err := rt.action(h, rt.gen, rec, r); err != nil {
		h.writeError(rec, r, err)
	}
}
