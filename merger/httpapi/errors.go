package httpapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/merger"
)

// httpError is an error with the status code and text to answer with.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

// opError is a Service error with the operation that failed, for the log;
// the reply shows only the Service's message.
type opError struct {
	op  string
	err error
}

func (e *opError) Error() string { return e.op + ": " + e.err.Error() }

func (e *opError) Unwrap() error { return e.err }

// publicMessage is the text of err as a reply shows it: without the
// operation an opError adds, and without the "merger: " that marks the
// Service's errors in our own logs (a client knows whom it asked).
func publicMessage(err error) string {
	var oe *opError
	if errors.As(err, &oe) {
		err = oe.err
	}
	return strings.TrimPrefix(err.Error(), "merger: ")
}

// validationError holds the parameter errors of a request (400 with a
// ValidationProblemDetails body).
type validationError struct {
	errors map[string][]string
}

func (e *validationError) Error() string {
	return fmt.Sprintf("invalid parameters: %v", e.errors)
}

// problemDetails is ASP.NET Core's ValidationProblemDetails as
// [ApiController] sends it for invalid parameters.
type problemDetails struct {
	Type   string              `json:"type"`
	Title  string              `json:"title"`
	Status int                 `json:"status"`
	Errors map[string][]string `json:"errors"`
}

// validationProblemType is the "type" ASP.NET Core 8 uses for a 400.
const validationProblemType = "https://tools.ietf.org/html/rfc9110#section-15.5.1"

// Reply texts that clients may match on.
const (
	textSessionNotFound = "Session not found"
	textImageNotFound   = "Image not found"
	textInternal        = "Internal server error"
)

// writeError answers a request that failed with err and logs it: Service
// errors by their kind (see the package doc), the handler's own errors
// with their status.
func (h *handler) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var (
		bp      *merger.BackPressureError
		he      *httpError
		ve      *validationError
		tooBig  *http.MaxBytesError
		level   = slog.LevelWarn
		status  int
		message string
	)
	switch {
	case errors.As(err, &ve):
		h.logError(r, slog.LevelWarn, http.StatusBadRequest, err)
		writeJSON(w, http.StatusBadRequest, typeProblem, problemDetails{
			Type:   validationProblemType,
			Title:  "One or more validation errors occurred.",
			Status: http.StatusBadRequest,
			Errors: ve.errors,
		})
		return
	case errors.As(err, &bp):
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(bp.RetryAfter)))
		status, message, level = http.StatusServiceUnavailable, "Busy, retry later: "+bp.Reason, slog.LevelInfo
	case errors.As(err, &tooBig):
		status, message = http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", tooBig.Limit)
	case errors.As(err, &he):
		status, message = he.status, he.msg
	case errors.Is(err, merger.ErrSessionNotFound):
		status, message = http.StatusNotFound, textSessionNotFound
	case errors.Is(err, merger.ErrImageNotFound):
		status, message = http.StatusNotFound, textImageNotFound
	case errors.Is(err, merger.ErrBadRequest), errors.Is(err, merger.ErrInvalidName):
		status, message = http.StatusBadRequest, publicMessage(err)
	case errors.Is(err, merger.ErrSessionClosed), errors.Is(err, merger.ErrConflict):
		status, message = http.StatusConflict, publicMessage(err)
	case errors.Is(err, merger.ErrQuotaExceeded):
		status, message = http.StatusInsufficientStorage, publicMessage(err)
	default:
		status, message, level = http.StatusInternalServerError, textInternal, slog.LevelError
	}
	if bp != nil {
		// Back-pressure comes in bursts (a client retrying, or one
		// holding many connections): one line per source and minute.
		h.logThrottled(r, level, "request refused: busy", "query", r.URL.RawQuery, "status", status, "err", err)
	} else {
		h.logError(r, level, status, err)
	}
	writeText(w, status, message)
}

// logError logs a failed request.
func (h *handler) logError(r *http.Request, level slog.Level, status int, err error) {
	h.log.Log(r.Context(), level, "request failed", "method", r.Method, "path", r.URL.Path,
		"query", r.URL.RawQuery, "status", status, "remote", r.RemoteAddr, "err", err)
}

// retryAfterSeconds rounds a back-pressure delay up to whole seconds, at
// least 1.
func retryAfterSeconds(d time.Duration) int {
	if d <= time.Second {
		return 1
	}
	s := (d + time.Second - 1) / time.Second
	if s > math.MaxInt32 {
		return math.MaxInt32
	}
	return int(s)
}

// writeText sends a text/plain reply (no trailing newline: the reference
// does not add one and clients compare the body).
func writeText(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", typeText)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(len(msg)))
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg))
}

// writeJSON sends v as JSON with the given content type.
func writeJSON(w http.ResponseWriter, status int, contentType string, v any) {
	b, err := json.Marshal(v)
	if err != nil { // only our own plain structs are marshalled
		writeText(w, http.StatusInternalServerError, textInternal)
		return
	}
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
