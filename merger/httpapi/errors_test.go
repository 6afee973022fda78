package httpapi

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/merger"
)

// TestErrorMapping drives every route into every kind of Service error.
func TestErrorMapping(t *testing.T) {
	cases := []struct {
		name       string
		err        error
		status     int
		body       string // "*": anything; "~x": contains x
		retryAfter string
	}{
		{"session not found", fmt.Errorf("load 1234: %w", merger.ErrSessionNotFound), 404, "Session not found", ""},
		{"image not found", fmt.Errorf("%w: /srv/orig/x.r1", merger.ErrImageNotFound), 404, "Image not found", ""},
		{"bad request", fmt.Errorf("%w: bitfieldSize must be 40", merger.ErrBadRequest), 400, "bad request: bitfieldSize must be 40", ""},
		{"invalid name", fmt.Errorf("%w %q: contains ..", merger.ErrInvalidName, "../x"), 400, `invalid image name "../x": contains ..`, ""},
		{"session closed", merger.ErrSessionClosed, 409, "the session no longer accepts uploads (merging or merged)", ""},
		{"conflict", fmt.Errorf("%w: img.r2 was merged by another session", merger.ErrConflict), 409, "conflict: img.r2 was merged by another session", ""},
		{"back-pressure", &merger.BackPressureError{RetryAfter: 1500 * time.Millisecond, Reason: "disk nearly full"}, 503, "~disk nearly full", "2"},
		{"back-pressure wrapped", fmt.Errorf("x: %w", &merger.BackPressureError{RetryAfter: 30 * time.Second, Reason: "copying"}), 503, "~copying", "30"},
		{"back-pressure zero", &merger.BackPressureError{Reason: "busy"}, 503, "*", "1"},
		{"quota", fmt.Errorf("%w: the session holds 820 clusters", merger.ErrQuotaExceeded), 507, "session quota exceeded: the session holds 820 clusters", ""},
		{"internal", errors.New("write /srv/merger/working/x/data: input/output error"), 500, "Internal server error", ""},
	}
	type call struct {
		op, method, path, form string
	}
	routes := func(id string) []call {
		return []call{
			{"create", "POST", "/v1/file/create", "imageName=x&revision=1&bitfieldSize=40"},
			{"create", "POST", "/api/file/create", "imageName=x&version=1&bitfieldSize=40"},
			{"update", "POST", "/v1/file/update?uuid=" + id + "&clusterindex=1", ""},
			{"update", "POST", "/api/file/update?guid=" + id + "&blockNumber=1", ""},
			{"merge", "POST", "/v1/file/merge", "uuid=" + id + "&originalFileSize=1&newFileSize=1"},
			{"merge", "POST", "/api/file/startmerge", "guid=" + id + "&originalFileSize=1&newFileSize=1"},
			{"status", "GET", "/v1/file/status?uuid=" + id, ""},
			{"status", "GET", "/api/file/status?guid=" + id, ""},
			{"top", "GET", "/v1/file/gettopmodifiedblocks?uuid=" + id + "&amount=3", ""},
			{"top", "GET", "/api/file/gettopmodifiedblocks?guid=" + id + "&amount=3", ""},
			{"status", "GET", "/v1/file/gettopmodifiedblocks?uuid=" + id + "&amount=3", ""},
		}
	}
	var logs bytes.Buffer
	f, srv := start(t, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	id := f.addSession("img", 1, merger.StateActive)
	full := make([]byte, MaxUpdateBytes)
	for _, c := range cases {
		for _, rt := range routes(id) {
			f.fail(rt.op, c.err)
			var r result
			switch {
			case rt.op == "update":
				r = send(t, srv, rt.method, rt.path, "application/octet-stream", full)
			case rt.method == "POST":
				r = post(t, srv, rt.path, rt.form)
			default:
				r = get(t, srv, rt.path)
			}
			f.fail(rt.op, nil)
			where := c.name + ": " + rt.op + " " + rt.path
			if r.status != c.status || r.header.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Errorf("%s: %d %q, want %d text/plain", where, r.status, r.header.Get("Content-Type"), c.status)
			}
			switch {
			case c.body == "*":
			case strings.HasPrefix(c.body, "~"):
				if !strings.Contains(r.body, c.body[1:]) {
					t.Errorf("%s: body %q, want it to contain %q", where, r.body, c.body[1:])
				}
			case r.body != c.body:
				t.Errorf("%s: body %q, want %q", where, r.body, c.body)
			}
			if got := r.header.Get("Retry-After"); got != c.retryAfter {
				t.Errorf("%s: Retry-After %q, want %q", where, got, c.retryAfter)
			}
		}
	}
	// Internal errors are logged with their details at ERROR, but not sent.
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "input/output error") {
		t.Errorf("internal error not logged:\n%s", logs.String())
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	for d, want := range map[time.Duration]int{
		-time.Second: 1, 0: 1, time.Millisecond: 1, time.Second: 1,
		time.Second + 1: 2, 10 * time.Second: 10, 2 * time.Minute: 120, 1 << 62: 1<<31 - 1,
	} {
		if got := retryAfterSeconds(d); got != want {
			t.Errorf("retryAfterSeconds(%v) = %d, want %d", d, got, want)
		}
	}
}

func TestToken(t *testing.T) {
	f, srv := start(t, Options{Token: "tok-123"})
	id := f.addSession("img", 1, merger.StateActive)
	path := "/v1/file/status?uuid=" + id
	for _, c := range []struct {
		auth      string
		status    int
		challenge string
	}{
		{"", 401, `Bearer realm="dnbd3-merger"`},
		{"Basic dG9rLTEyMw==", 401, `Bearer realm="dnbd3-merger"`},
		{"Bearer", 401, `Bearer realm="dnbd3-merger"`},
		{"Bearer tok-12", 401, `Bearer realm="dnbd3-merger", error="invalid_token"`},
		{"Bearer tok-1234", 401, `Bearer realm="dnbd3-merger", error="invalid_token"`},
		{"Bearer TOK-123", 401, `Bearer realm="dnbd3-merger", error="invalid_token"`},
		{"Bearer tok-123", 200, ""},
		{"bearer  tok-123 ", 200, ""},
	} {
		var r result
		if c.auth == "" {
			r = get(t, srv, path)
		} else {
			r = get(t, srv, path, "Authorization", c.auth)
		}
		if r.status != c.status || r.header.Get("WWW-Authenticate") != c.challenge {
			t.Errorf("Authorization %q: %d WWW-Authenticate %q, want %d %q", c.auth, r.status, r.header.Get("WWW-Authenticate"), c.status, c.challenge)
		}
	}
	// Authentication comes first, even for unknown routes and bad requests.
	get(t, srv, "/nothing").want(t, 401, "text/plain; charset=utf-8", "*")
	post(t, srv, "/v1/file/create", "imageName=x&revision=1&bitfieldSize=40").want(t, 401, "*", "*")
	if len(f.creates) != 0 {
		t.Fatal("create ran without the token")
	}
	get(t, srv, "/nothing", "Authorization", "Bearer tok-123").want(t, 404, "*", "Not found")
}

func TestStatusJSON(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("pool/img", 5, merger.StateActive)
	f.mu.Lock()
	s := f.sessions[id]
	s.info.MergedClusters, s.info.TotalClusters, s.info.NewRevision = 3, 11, 6
	s.info.State = merger.StateMerging
	f.mu.Unlock()

	// The reference's SessionStatus model: exactly these keys.
	want := map[string]map[string]any{
		"/v1/File/Status?uuid=" + id: {"imageName": "pool/img", "mergedClusters": 3.0, "newImageVersion": 6.0,
			"originalImageVersion": 5.0, "state": "Merging", "totalClusters": 11.0},
		"/api/File/Status?guid=" + id: {"imageName": "pool/img", "mergedBlocks": 3.0, "newImageVersion": 6.0,
			"originalImageVersion": 5.0, "state": "Merging", "totalBlocks": 11.0},
	}
	for path, w := range want {
		r := get(t, srv, path)
		r.want(t, 200, "application/json; charset=utf-8", "*")
		got := jsonObject(t, r.body)
		if len(got) != len(w) {
			t.Errorf("%s: %d keys %v, want %v", path, len(got), got, w)
		}
		for k, v := range w {
			if got[k] != v {
				t.Errorf("%s: %s = %#v, want %#v", path, k, got[k], v)
			}
		}
	}
	// Every state is reported as it is, PascalCase.
	for _, st := range []merger.State{merger.StateActive, merger.StateCopying, merger.StateMerging, merger.StateDone, merger.StateFailed} {
		f.setState(id, st, "")
		if got := jsonObject(t, get(t, srv, "/v1/file/status?uuid="+id).body)["state"]; got != string(st) {
			t.Errorf("state %v reported as %v", st, got)
		}
	}
	get(t, srv, "/v1/file/status?uuid=00000000-0000-0000-0000-000000000000").want(t, 404, "text/plain; charset=utf-8", "Session not found")
	get(t, srv, "/v1/file/status?uuid=abc").wantProblem(t, "uuid")
	get(t, srv, "/v1/file/status").wantProblem(t, "uuid")
	get(t, srv, "/api/file/status?uuid="+id).wantProblem(t, "guid")
}

func TestTopModified(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 1, merger.StateActive)
	f.mu.Lock()
	f.sessions[id].mods = map[int]uint32{4: 2, 9: 7, 1: 1}
	f.mu.Unlock()
	r := get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid="+id+"&amount=2")
	r.want(t, 200, "application/json; charset=utf-8", `[{"clusterNumber":9,"modifications":7},{"clusterNumber":4,"modifications":2}]`)
	r = get(t, srv, "/api/File/GetTopModifiedBlocks?guid="+id+"&amount=5")
	r.want(t, 200, "application/json; charset=utf-8", `[{"blockNumber":9,"modifications":7},{"blockNumber":4,"modifications":2},{"blockNumber":1,"modifications":1}]`)
	get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid="+id+"&amount=0").want(t, 200, "application/json; charset=utf-8", `[]`)
	f.calls = nil
	get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid="+id+"&amount=-1").wantProblem(t, "amount")
	get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid="+id).wantProblem(t, "amount")
	get(t, srv, "/v1/File/GetTopModifiedBlocks?amount=1").wantProblem(t, "uuid")
	if f.callCount() != 0 {
		t.Errorf("service called for invalid requests: %v", f.calls)
	}
	// A merged session: 204 without body, on both generations.
	f.setState(id, merger.StateDone, "")
	for _, path := range []string{"/v1/file/gettopmodifiedblocks?uuid=" + id + "&amount=2", "/api/file/gettopmodifiedblocks?guid=" + id + "&amount=2"} {
		r := get(t, srv, path)
		if r.status != http.StatusNoContent || r.body != "" {
			t.Errorf("%s for a Done session: %d %q, want 204", path, r.status, r.body)
		}
	}
	// Other states still list.
	f.setState(id, merger.StateMerging, "")
	get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid="+id+"&amount=1").want(t, 200, "*", `[{"clusterNumber":9,"modifications":7}]`)
	get(t, srv, "/v1/File/GetTopModifiedBlocks?uuid=00000000-0000-0000-0000-000000000000&amount=1").want(t, 404, "*", "Session not found")
}

func TestRequestLogAndPanic(t *testing.T) {
	var logs bytes.Buffer
	f := newFake()
	h := New(f, Options{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	id := f.addSession("img", 1, merger.StateActive)

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/file/status?uuid="+id, nil))
	if rec.Code != 200 {
		t.Fatalf("status %d", rec.Code)
	}
	line := logs.String()
	for _, want := range []string{"level=DEBUG", "msg=request", "method=GET", "path=/v1/file/status", "status=200", "duration="} {
		if !strings.Contains(line, want) {
			t.Errorf("request log %q lacks %q", line, want)
		}
	}

	logs.Reset()
	f.panicOn = "status"
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/file/status?uuid="+id, nil))
	if rec.Code != 500 || rec.Body.String() != "Internal server error" {
		t.Fatalf("panic: %d %q", rec.Code, rec.Body.String())
	}
	if !strings.Contains(logs.String(), "fake panic in status") || !strings.Contains(logs.String(), "status=500") {
		t.Errorf("panic not logged: %s", logs.String())
	}
}
