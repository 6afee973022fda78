package upload

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// MaxRetryAfter caps the delay a merger can ask for with Retry-After, like
// the reference client does.
const MaxRetryAfter = 120 * time.Second

// parseRetryAfter interprets a Retry-After header value: a whole number of
// seconds greater than 0, or an HTTP date in the future (which the
// reference client does not understand). The result is capped at
// MaxRetryAfter. ok is false for an empty, zero, past or malformed value.
func parseRetryAfter(v string, now time.Time) (d time.Duration, ok bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if strings.Trim(v, "0123456789") == "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil { // only digits, so the number is too large
			return MaxRetryAfter, true
		}
		if n == 0 {
			return 0, false
		}
		if n >= uint64(MaxRetryAfter/time.Second) {
			return MaxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	d = t.Sub(now)
	if d <= 0 {
		return 0, false
	}
	return min(d, MaxRetryAfter), true
}
