package httpapi

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/merger"
)

// rejectedLines returns the "request rejected" lines of a text log.
func rejectedLines(logs *bytes.Buffer) []string {
	var out []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `msg="request rejected"`) {
			out = append(out, l)
		}
	}
	return out
}

// TestUnauthorizedLogThrottled checks that a client sending requests
// without the token cannot flood the log: one line per source address.
func TestUnauthorizedLogThrottled(t *testing.T) {
	var logs bytes.Buffer
	f := newFake()
	h := New(f, Options{Token: "tok", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	id := f.addSession("img", 1, merger.StateActive)
	send := func(remote string) {
		r := httptest.NewRequest("GET", "/v1/file/status?uuid="+id, nil)
		r.RemoteAddr = remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		if rec.Code != 401 {
			t.Fatalf("status %d, want 401", rec.Code)
		}
	}
	for i := range 50 {
		send(fmt.Sprintf("192.0.2.7:%d", 40000+i))
	}
	send("[2001:db8::1]:5000")
	lines := rejectedLines(&logs)
	if len(lines) != 2 {
		t.Fatalf("%d lines for 51 rejected requests from 2 addresses, want 2:\n%s", len(lines), logs.String())
	}
	if !strings.Contains(lines[0], "192.0.2.7") || !strings.Contains(lines[1], "2001:db8::1") {
		t.Errorf("lines do not name the sources:\n%s", logs.String())
	}
}

// TestLogThrottleSuppressedCount checks that the next line after the
// interval reports the suppressed ones, and that the table of sources
// stays bounded whatever the number of addresses.
func TestLogThrottleSuppressedCount(t *testing.T) {
	var logs bytes.Buffer
	f := newFake()
	h := New(f, Options{Token: "tok", Logger: slog.New(slog.NewTextHandler(&logs, nil))}).(*handler)
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	h.throttle.now = func() time.Time { return now }
	send := func(remote string) {
		r := httptest.NewRequest("POST", "/v1/file/create", nil)
		r.RemoteAddr = remote
		h.ServeHTTP(httptest.NewRecorder(), r)
	}
	for range 10 {
		send("192.0.2.7:1")
	}
	now = now.Add(59 * time.Second)
	send("192.0.2.7:1")
	if n := len(rejectedLines(&logs)); n != 1 {
		t.Fatalf("%d lines within a minute, want 1", n)
	}
	now = now.Add(2 * time.Second)
	send("192.0.2.7:1")
	lines := rejectedLines(&logs)
	if len(lines) != 2 || !strings.Contains(lines[1], "suppressed=10") || strings.Contains(lines[0], "suppressed") {
		t.Fatalf("want a second line with suppressed=10:\n%s", logs.String())
	}

	// Many addresses: the table stays bounded, and so does the log.
	logs.Reset()
	for i := range 3 * throttleSources {
		send(fmt.Sprintf("10.%d.%d.%d:80", i>>16&255, i>>8&255, i&255))
	}
	h.throttle.mu.Lock()
	n := len(h.throttle.entries)
	h.throttle.mu.Unlock()
	if n > throttleSources+1 {
		t.Errorf("%d sources remembered, want at most %d", n, throttleSources+1)
	}
	if got := len(rejectedLines(&logs)); got > throttleSources+1 {
		t.Errorf("%d lines for %d sources within a minute, want at most %d", got, 3*throttleSources, throttleSources+1)
	}
	// After the interval the old entries make room again.
	now = now.Add(2 * time.Minute)
	logs.Reset()
	send("192.0.2.99:1")
	if !strings.Contains(logs.String(), "192.0.2.99") {
		t.Errorf("a new source after the interval was not logged:\n%s", logs.String())
	}
}
