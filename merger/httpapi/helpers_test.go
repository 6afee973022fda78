package httpapi

import (
	"bytes"
	"encoding/json"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

const formType = "application/x-www-form-urlencoded"

// start serves a handler for a fresh fake Service.
func start(t *testing.T, opts Options) (*fakeService, *httptest.Server) {
	t.Helper()
	return startWith(t, opts, nil)
}

// startWith is start with a hook that configures the http.Server before
// it starts.
func startWith(t *testing.T, opts Options, configure func(*http.Server)) (*fakeService, *httptest.Server) {
	t.Helper()
	f := newFake()
	if opts.Logger == nil {
		opts.Logger = testutil.Logger(t)
	}
	srv := httptest.NewUnstartedServer(New(f, opts))
	if configure != nil {
		configure(srv.Config)
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return f, srv
}

// result is a reply with its body read.
type result struct {
	status int
	header http.Header
	body   string
}

// send sends one request; hdr holds extra header name/value pairs.
func send(t *testing.T, srv *httptest.Server, method, path, ctype string, body []byte, hdr ...string) result {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return result{resp.StatusCode, resp.Header, string(b)}
}

// post sends an urlencoded form.
func post(t *testing.T, srv *httptest.Server, path, form string, hdr ...string) result {
	t.Helper()
	return send(t, srv, http.MethodPost, path, formType, []byte(form), hdr...)
}

// get sends a GET.
func get(t *testing.T, srv *httptest.Server, path string, hdr ...string) result {
	t.Helper()
	return send(t, srv, http.MethodGet, path, "", nil, hdr...)
}

// multipartForm encodes fields (name, value, name, value, ...) as
// multipart/form-data, like curl_mime does.
func multipartForm(t *testing.T, fields ...string) (ctype string, body []byte) {
	t.Helper()
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	for i := 0; i+1 < len(fields); i += 2 {
		if err := mw.WriteField(fields[i], fields[i+1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return mw.FormDataContentType(), b.Bytes()
}

// want checks status, content type and body of a reply.
func (r result) want(t *testing.T, status int, ctype, body string) {
	t.Helper()
	if r.status != status {
		t.Errorf("status %d, want %d (body %q)", r.status, status, r.body)
	}
	if got := r.header.Get("Content-Type"); ctype != "*" && got != ctype {
		t.Errorf("Content-Type %q, want %q", got, ctype)
	}
	if body != "*" && r.body != body {
		t.Errorf("body %q, want %q", r.body, body)
	}
}

// problem decodes a 400 validation reply and checks its shape; it returns
// the names of the invalid parameters.
func (r result) problem(t *testing.T) []string {
	t.Helper()
	if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != "application/problem+json; charset=utf-8" {
		t.Fatalf("got %d %q %q, want a 400 problem+json", r.status, r.header.Get("Content-Type"), r.body)
	}
	var p struct {
		Type   string              `json:"type"`
		Title  string              `json:"title"`
		Status int                 `json:"status"`
		Errors map[string][]string `json:"errors"`
	}
	if err := json.Unmarshal([]byte(r.body), &p); err != nil {
		t.Fatalf("problem body %q: %v", r.body, err)
	}
	if p.Title != "One or more validation errors occurred." || p.Status != 400 || !strings.HasPrefix(p.Type, "https://") {
		t.Errorf("problem = %+v", p)
	}
	var keys []string
	for k, msgs := range p.Errors {
		if len(msgs) == 0 || msgs[0] == "" {
			t.Errorf("no message for %s", k)
		}
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// wantProblem checks a 400 validation reply names exactly the parameters
// in keys.
func (r result) wantProblem(t *testing.T, keys ...string) {
	t.Helper()
	got := r.problem(t)
	slices.Sort(keys)
	if !reflect.DeepEqual(got, keys) {
		t.Errorf("invalid parameters %v, want %v (body %s)", got, keys, r.body)
	}
}

// sparseBody builds an update body with the given bits set; block i is
// filled with byte(bit+1).
func sparseBody(bitsSet ...int) ([cowformat.BitfieldSize]byte, []byte) {
	var bf [cowformat.BitfieldSize]byte
	var blocks []byte
	slices.Sort(bitsSet)
	for _, b := range bitsSet {
		bf[b/8] |= 1 << (b % 8)
		blocks = append(blocks, bytes.Repeat([]byte{byte(b + 1)}, cowformat.BlockSize)...)
	}
	return bf, blocks
}

// jsonKeys decodes a JSON object and returns it as a map.
func jsonObject(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("not a JSON object: %q: %v", s, err)
	}
	return m
}
