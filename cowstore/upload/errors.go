package upload

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// StatusError is a reply from the merger whose status is not 2xx.
type StatusError struct {
	// Op is the API call: "create", "update", "merge" or "status".
	Op string
	// StatusCode is the HTTP status of the reply.
	StatusCode int
	// Body is the start of the reply body (at most 200 bytes, control
	// characters replaced), for error messages.
	Body string
	// RetryAfter is the delay the merger asked for with a Retry-After
	// header (seconds or an HTTP date, at most MaxRetryAfter); 0 if the
	// header was missing or not usable.
	RetryAfter time.Duration
}

// Error describes the reply.
func (e *StatusError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "merger %s: HTTP %d", e.Op, e.StatusCode)
	if t := http.StatusText(e.StatusCode); t != "" {
		b.WriteString(" " + t)
	}
	if e.Body != "" {
		fmt.Fprintf(&b, ": %q", e.Body)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry after %s)", e.RetryAfter)
	}
	return b.String()
}

// BackPressure reports whether the reply asks the client to slow down and
// try again later rather than being a failure: status 503 (Service
// Unavailable) or 429 (Too Many Requests), or any failure that carries a
// usable Retry-After header. delay is the Retry-After value, or 0 if the
// merger named none (the caller then picks its own pause).
func (e *StatusError) BackPressure() (delay time.Duration, ok bool) {
	switch {
	case e.StatusCode == http.StatusServiceUnavailable, e.StatusCode == http.StatusTooManyRequests:
		return e.RetryAfter, true
	case e.RetryAfter > 0:
		return e.RetryAfter, true
	}
	return 0, false
}

// permanent reports whether retrying the same request cannot help: a 4xx
// reply other than 408 (timeout), 425 (too early) and 429 (too many).
func (e *StatusError) permanent() bool {
	if _, bp := e.BackPressure(); bp {
		return false
	}
	switch e.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooEarly:
		return false
	}
	return e.StatusCode >= 400 && e.StatusCode < 500
}

// BackPressure reports whether err is (or wraps) a merger reply asking the
// client to slow down, and the delay it asked for (0 if none). See
// StatusError.BackPressure.
func BackPressure(err error) (delay time.Duration, ok bool) {
	var se *StatusError
	if errors.As(err, &se) {
		return se.BackPressure()
	}
	return 0, false
}

// isPermanent reports whether err is a merger reply that a retry of the
// same request cannot fix.
func isPermanent(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.permanent()
}

// printable shortens b to at most n bytes and replaces control characters,
// so that a reply body can go into an error message.
func printable(b []byte, n int) string {
	cut := len(b) > n
	if cut {
		b = b[:n]
	}
	s := strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(string(b), "?"))
	s = strings.TrimSpace(s)
	if cut {
		s += "…"
	}
	return s
}
