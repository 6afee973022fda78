package httpapi

import (
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/statusui"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/prometheus/client_golang/prometheus"
)

// Options configure the handler New returns.
type Options struct {
	// Token, if not empty, is the bearer token every request must carry
	// ("Authorization: Bearer <Token>"); requests without it get 401.
	Token string
	// Logger receives a Debug line per request and the errors;
	// nil means slog.Default().
	Logger *slog.Logger
	// MaxUploads bounds the uploads received and stored at once, each
	// holding a 1.3 MB buffer; more wait up to 10 s for a slot, then get
	// 503 with Retry-After (see uploads.go). 0 means DefaultMaxUploads.
	MaxUploads int
	// MaxUploadsPerClient bounds the uploads (waiting ones included)
	// from one client address; more get 503 with Retry-After at once.
	// 0 means DefaultMaxUploadsPerClient.
	MaxUploadsPerClient int
	// UploadTimeout is how long an admitted upload's body may take to
	// arrive; 0 means DefaultUploadTimeout.
	UploadTimeout time.Duration
	// Metrics, if set, receives the API's counters and is served at
	// GET /metrics (with the token, unless OpenMetrics).
	Metrics *prometheus.Registry
	// OpenMetrics serves /metrics without the token (for a Prometheus
	// that cannot send one). The status page always needs the token.
	OpenMetrics bool
	// StatusPage serves the HTML status page at GET / and its data at
	// /status.json (extra.go).
	StatusPage bool
	// Version is shown by the status page.
	Version string
}

// handler is the http.Handler New returns.
type handler struct {
	svc    merger.Service
	log    *slog.Logger
	auth   *bearerAuth // nil without a token
	routes map[string]route
	// throttle limits the lines about refused requests (see
	// logthrottle.go).
	throttle *logThrottle
	// uploads admits uploads (see uploads.go).
	uploads       *uploadLimiter
	uploadTimeout time.Duration

	met         *apiMetrics
	metrics     http.Handler // nil without Options.Metrics
	openMetrics bool
	page        *statusui.Page // nil without Options.StatusPage (extra.go)
	version     string
	started     time.Time
}

// New returns the HTTP API of both generations for svc.
func New(svc merger.Service, opts Options) http.Handler {
	h := &handler{
		svc:      svc,
		log:      opts.Logger,
		auth:     newBearerAuth(opts.Token),
		throttle: newLogThrottle(time.Now),
	}
	if h.log == nil {
		h.log = slog.Default()
	}
	maxUploads, perClient := opts.MaxUploads, opts.MaxUploadsPerClient
	if maxUploads <= 0 {
		maxUploads = DefaultMaxUploads
	}
	if perClient <= 0 {
		perClient = DefaultMaxUploadsPerClient
	}
	h.uploads = newUploadLimiter(maxUploads, min(perClient, maxUploads), uploadWait)
	h.uploadTimeout = opts.UploadTimeout
	if h.uploadTimeout <= 0 {
		h.uploadTimeout = DefaultUploadTimeout
	}
	h.routes = buildRoutes(v1API, seedAPI)
	h.met = newAPIMetrics()
	h.version, h.started = opts.Version, time.Now()
	if opts.StatusPage {
		h.page = newStatusPage()
	}
	if opts.Metrics != nil {
		h.met.register(opts.Metrics)
		h.metrics = metricsHandler(opts.Metrics)
		h.openMetrics = opts.OpenMetrics
	}
	return h
}

// ServeHTTP authenticates the request, finds its route and runs it,
// logging the outcome.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w}
	var rt route
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
		h.met.observe(rt.upload, rec.status())
		h.log.Debug("request", "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery,
			"status", rec.status(), "bytes", rec.written, "duration", time.Since(start), "remote", r.RemoteAddr)
	}()
	if h.serveExtra(rec, r) {
		return // /metrics and the status page (extra.go)
	}
	if h.auth != nil {
		if ok, reason := h.auth.check(rec, r); !ok {
			h.logThrottled(r, slog.LevelWarn, "request rejected", "reason", reason)
			return
		}
	}
	rt, ok := h.lookup(r.URL.Path)
	rt.upload = ok && rt.upload
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

// logThrottled logs a line about a refused request, at most one per
// source address and message per minute (see logthrottle.go); the line
// that gets through says how many were suppressed before it.
func (h *handler) logThrottled(r *http.Request, level slog.Level, msg string, args ...any) {
	ok, suppressed := h.throttle.allow(msg, r.RemoteAddr)
	if !ok {
		return
	}
	args = append(args, "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	h.log.Log(r.Context(), level, msg, args...)
}
