package upload

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// fixture returns the path of a file of the reference client's COW session
// (../shared/testdata/cow-session-v3, see its README).
func fixture(t *testing.T, elem ...string) string {
	t.Helper()
	return testutil.Testdata(t, append([]string{"cow-session-v3"}, elem...)...)
}

const fixtureUUID = "c0ffee00-5e71-4d3b-9a0c-000000000001"

// seen is one request a recorder saw.
type seen struct {
	method, uri string
	header      http.Header
	body        []byte
	contentLen  int64
}

// recorder is an httptest server that records requests and answers with a
// fixed reply.
type recorder struct {
	*httptest.Server
	mu     sync.Mutex
	reqs   []seen
	status int
	body   string
	header map[string]string
}

func newRecorder(t *testing.T, status int, body string, header map[string]string) *recorder {
	rec := &recorder{status: status, body: body, header: header}
	rec.Server = httptest.NewServer(http.HandlerFunc(rec.serve))
	t.Cleanup(rec.Close)
	return rec
}

func (rec *recorder) serve(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, seen{r.Method, r.RequestURI, r.Header.Clone(), b, r.ContentLength})
	rec.mu.Unlock()
	for k, v := range rec.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(rec.status)
	io.WriteString(w, rec.body)
}

func (rec *recorder) last(t *testing.T) seen {
	t.Helper()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reqs) == 0 {
		t.Fatal("no request seen")
	}
	return rec.reqs[len(rec.reqs)-1]
}

func newTestMerger(t *testing.T, target string, cfg MergerConfig) *MergerClient {
	t.Helper()
	m, err := NewMergerClient(target, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.CloseIdleConnections)
	return m
}

// hostPort strips the scheme, giving the -C form.
func hostPort(url string) string { return strings.TrimPrefix(url, "http://") }

func TestParseMergerURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:5000":             "http://127.0.0.1:5000",
		"localhost:5000":             "http://localhost:5000",
		"[::1]:5000":                 "http://[::1]:5000",
		"merger.example":             "http://merger.example",
		"http://h:1/":                "http://h:1",
		"https://h/prefix/":          "https://h/prefix",
		" https://h:8443/a/b ":       "https://h:8443/a/b",
		"merger.example:80/sub/path": "http://merger.example:80/sub/path",
	} {
		got, err := parseMergerURL(in)
		if err != nil || got != want {
			t.Errorf("parseMergerURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "ftp://h", "http://", "http://u:p@h", "h:1?x=1", "http://h/#f", "http://[::1"} {
		if got, err := parseMergerURL(bad); err == nil {
			t.Errorf("parseMergerURL(%q) = %q, want an error", bad, got)
		}
	}
}

func TestCreateRequest(t *testing.T) {
	rec := newRecorder(t, 200, fixtureUUID, nil)
	m := newTestMerger(t, hostPort(rec.URL), MergerConfig{})
	id, err := m.Create(context.Background(), "test", 1)
	if err != nil || id != fixtureUUID {
		t.Fatalf("Create = %q, %v", id, err)
	}
	r := rec.last(t)
	// The body the reference client sent (cow-format.md §13).
	if r.method != "POST" || r.uri != "/v1/file/create" || string(r.body) != "revision=1&bitfieldSize=40&imageName=test" {
		t.Fatalf("request %s %s %q", r.method, r.uri, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/x-www-form-urlencoded" {
		t.Errorf("Content-Type %q", ct)
	}
	if r.header.Get("Accept") != "*/*" || r.header.Get("Authorization") != "" || r.contentLen != int64(len(r.body)) {
		t.Errorf("headers %v, length %d", r.header, r.contentLen)
	}

	// Names are escaped like curl_easy_escape.
	if _, err := m.Create(context.Background(), "pool/win 10~x+y&z=ä", 65535); err != nil {
		t.Fatal(err)
	}
	if got := string(rec.last(t).body); got != "revision=65535&bitfieldSize=40&imageName=pool%2Fwin%2010~x%2By%26z%3D%C3%A4" {
		t.Fatalf("escaped body %q", got)
	}
}

func TestCreateReplies(t *testing.T) {
	guid36 := "0123456789abcdef0123456789abcdef0123"
	for _, tc := range []struct {
		status  int
		body    string
		want    string
		errPart string
	}{
		{200, guid36, guid36, ""},
		{201, "short-id", "short-id", ""},
		{200, fixtureUUID + "\n", fixtureUUID, ""},
		{200, fixtureUUID + "\r\n", fixtureUUID, ""},
		{200, guid36 + "x", "", "37 characters"},
		{200, `"` + fixtureUUID + `"`, "", "38 characters"},
		{200, fixtureUUID + " ", "", "37 characters"},
		{200, "", "", "empty reply"},
		{200, "a b", "", "spaces"},
		{404, "Image not found", "", `HTTP 404 Not Found: "Image not found" (does the merger have`},
		{500, strings.Repeat("x", 5000), "", "HTTP 500"},
	} {
		rec := newRecorder(t, tc.status, tc.body, nil)
		m := newTestMerger(t, rec.URL, MergerConfig{})
		id, err := m.Create(context.Background(), "img", 3)
		if tc.errPart == "" {
			if err != nil || id != tc.want {
				t.Errorf("reply %d %q: got %q, %v", tc.status, tc.body, id, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.errPart) {
			t.Errorf("reply %d %q: got %q, %v; want an error with %q", tc.status, tc.body, id, err, tc.errPart)
		}
		if err != nil && len(err.Error()) > 400 {
			t.Errorf("error message too long: %d bytes", len(err.Error()))
		}
	}
}

// fixtureCluster rebuilds the bitfield and blocks of a cluster of the
// fixture session from its data file.
func fixtureCluster(t *testing.T, data []byte, slot int, bitsSet ...int) ([cowformat.BitfieldSize]byte, []byte) {
	var bf [cowformat.BitfieldSize]byte
	var blocks []byte
	base := cowformat.ClusterSize * (slot + 1)
	for _, b := range bitsSet {
		bf[b/8] |= 1 << (b % 8)
		blocks = append(blocks, data[base+b*cowformat.BlockSize:base+(b+1)*cowformat.BlockSize]...)
	}
	return bf, blocks
}

func TestUpdateMatchesReferenceBodies(t *testing.T) {
	data, err := os.ReadFile(fixture(t, "data"))
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(t, 200, "", nil)
	m := newTestMerger(t, hostPort(rec.URL), MergerConfig{})
	for _, c := range []struct {
		cluster, slot int
		bits          []int
	}{{0, 0, []int{0, 1, 319}}, {1, 1, []int{0, 1, 2}}, {6, 2, []int{155}}} {
		bf, blocks := fixtureCluster(t, data, c.slot, c.bits...)
		if err := m.Update(context.Background(), fixtureUUID, c.cluster, bf, blocks); err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(fixture(t, "merger-uploads", fmt.Sprintf("cluster-%d.bin", c.cluster)))
		if err != nil {
			t.Fatal(err)
		}
		r := rec.last(t)
		wantURI := fmt.Sprintf("/v1/file/update?uuid=%s&clusterindex=%d", fixtureUUID, c.cluster)
		if r.method != "POST" || r.uri != wantURI {
			t.Errorf("request line %s %s, want POST %s", r.method, r.uri, wantURI)
		}
		if !bytes.Equal(r.body, want) || r.contentLen != int64(len(want)) {
			t.Errorf("cluster %d: body of %d bytes (Content-Length %d) differs from the reference's %d bytes", c.cluster, len(r.body), r.contentLen, len(want))
		}
		if ct := r.header.Get("Content-Type"); ct != "application/octet-stream" {
			t.Errorf("Content-Type %q", ct)
		}
		if r.header.Get("Expect") != "" || r.header.Get("Transfer-Encoding") != "" {
			t.Errorf("unexpected headers %v", r.header)
		}
	}
	// Blocks that do not match the bitfield are refused before sending.
	if err := m.Update(context.Background(), fixtureUUID, 1, [cowformat.BitfieldSize]byte{0: 1}, nil); err == nil {
		t.Error("Update with missing blocks succeeded")
	}
	if err := m.Update(context.Background(), "", 1, [cowformat.BitfieldSize]byte{}, nil); err == nil {
		t.Error("Update without a uuid succeeded")
	}
}

func TestUpdateOutcomes(t *testing.T) {
	now := time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name       string
		status     int
		retryAfter string
		ok         bool
		bp         bool
		delay      time.Duration
	}{
		{"200", 200, "", true, false, 0},
		{"204 with retry-after", 204, "5", true, false, 0},
		{"503 seconds", 503, "5", false, true, 5 * time.Second},
		{"503 bare", 503, "", false, true, 0},
		{"503 garbage", 503, "soon", false, true, 0},
		{"503 capped", 503, "9999", false, true, MaxRetryAfter},
		{"503 date", 503, now.Add(42 * time.Second).Format(http.TimeFormat), false, true, 42 * time.Second},
		{"429", 429, "", false, true, 0},
		{"500 with retry-after", 500, "7", false, true, 7 * time.Second},
		{"500", 500, "", false, false, 0},
		{"500 garbage retry-after", 500, "-3", false, false, 0},
		{"404", 404, "", false, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr map[string]string
			if tc.retryAfter != "" {
				hdr = map[string]string{"Retry-After": tc.retryAfter}
			}
			rec := newRecorder(t, tc.status, "nope", hdr)
			m := newTestMerger(t, rec.URL, MergerConfig{Now: func() time.Time { return now }})
			err := m.Update(context.Background(), fixtureUUID, 5, [cowformat.BitfieldSize]byte{}, nil)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v", err)
			}
			d, bp := BackPressure(err)
			if bp != tc.bp || d != tc.delay {
				t.Fatalf("BackPressure = %v, %v; want %v, %v (err %v)", d, bp, tc.delay, tc.bp, err)
			}
			var se *StatusError
			if !tc.ok && (!errors.As(err, &se) || se.StatusCode != tc.status || se.Op != "update" || se.Body != "nope") {
				t.Fatalf("error %#v", err)
			}
			if got := rec.last(t).contentLen; got != 40 {
				t.Fatalf("Content-Length %d for an empty cluster", got)
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"1":                       time.Second,
		" 30 ":                    30 * time.Second,
		"119":                     119 * time.Second,
		"120":                     120 * time.Second,
		"121":                     120 * time.Second,
		"99999999999999999999999": 120 * time.Second,
		now.Add(10 * time.Second).Format(http.TimeFormat): 10 * time.Second,
		now.Add(time.Hour).Format(http.TimeFormat):        120 * time.Second,
		now.Add(90 * time.Second).Format(time.RFC850):     90 * time.Second,
		now.Add(5 * time.Second).UTC().Format(time.ANSIC): 5 * time.Second,
	} {
		if got, ok := parseRetryAfter(in, now); !ok || got != want {
			t.Errorf("parseRetryAfter(%q) = %v, %v; want %v", in, got, ok, want)
		}
	}
	for _, in := range []string{"", "0", "-1", "+5", "1.5", "5s", "soon", now.Add(-time.Minute).Format(http.TimeFormat)} {
		if got, ok := parseRetryAfter(in, now); ok {
			t.Errorf("parseRetryAfter(%q) = %v, want not ok", in, got)
		}
	}
}

func TestMergeAndStatusRequests(t *testing.T) {
	rec := newRecorder(t, 200, "Merge started", nil)
	m := newTestMerger(t, hostPort(rec.URL), MergerConfig{})
	if err := m.Merge(context.Background(), fixtureUUID, 8388608, 9000000); err != nil {
		t.Fatal(err)
	}
	r := rec.last(t)
	if r.method != "POST" || r.uri != "/v1/file/merge" || string(r.body) != "originalFileSize=8388608&newFileSize=9000000&uuid="+fixtureUUID ||
		r.header.Get("Content-Type") != "application/x-www-form-urlencoded" {
		t.Fatalf("merge request %s %s %q %v", r.method, r.uri, r.body, r.header)
	}

	js := `{"imageName":"cowsrc","mergedClusters":3,"newImageVersion":2,"originalImageVersion":1,"state":"Done","totalClusters":3}`
	rec2 := newRecorder(t, 200, js, map[string]string{"Content-Type": "application/json"})
	m2 := newTestMerger(t, rec2.URL+"/prefix/", MergerConfig{})
	st, err := m2.Status(context.Background(), fixtureUUID)
	want := SessionStatus{ImageName: "cowsrc", MergedClusters: 3, NewImageVersion: 2, OriginalImageVersion: 1, State: "Done", TotalClusters: 3}
	if err != nil || st != want {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	if r := rec2.last(t); r.method != "GET" || r.uri != "/prefix/v1/file/status?uuid="+fixtureUUID {
		t.Fatalf("status request %s %s", r.method, r.uri)
	}
	rec3 := newRecorder(t, 200, "<html>", nil)
	if _, err := newTestMerger(t, rec3.URL, MergerConfig{}).Status(context.Background(), fixtureUUID); err == nil {
		t.Fatal("Status accepted a non-JSON reply")
	}
}

func TestHTTPSWithCAFileAndToken(t *testing.T) {
	var gotAuth atomic.Value
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth.Store(r.Header.Get("Authorization"))
		io.WriteString(w, fixtureUUID)
	}))
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // the untrusted-certificate case logs a handshake error
	ts.StartTLS()
	defer ts.Close()
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}), 0o600)
	tokFile := filepath.Join(dir, "token")
	os.WriteFile(tokFile, []byte("  s3cr3t-token\n"), 0o600)
	tok, err := ReadTokenFile(tokFile)
	if err != nil || tok != "s3cr3t-token" {
		t.Fatalf("ReadTokenFile = %q, %v", tok, err)
	}

	m := newTestMerger(t, ts.URL, MergerConfig{CAFile: caFile, Token: tok})
	if id, err := m.Create(context.Background(), "img", 1); err != nil || id != fixtureUUID {
		t.Fatalf("Create over https = %q, %v", id, err)
	}
	if got := gotAuth.Load(); got != "Bearer s3cr3t-token" {
		t.Fatalf("Authorization %q", got)
	}
	// A caller's client works too.
	m2 := newTestMerger(t, ts.URL, MergerConfig{Client: ts.Client()})
	if _, err := m2.Create(context.Background(), "img", 1); err != nil {
		t.Fatal(err)
	}
	// Without the CA the certificate is not trusted.
	m3 := newTestMerger(t, ts.URL, MergerConfig{})
	if _, err := m3.Create(context.Background(), "img", 1); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("untrusted certificate: %v", err)
	}

	for name, content := range map[string]string{"empty": " \n", "two lines": "a\nb\n", "space": "a b"} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		if _, err := ReadTokenFile(p); err == nil {
			t.Errorf("ReadTokenFile accepted %q", content)
		}
	}
	if _, err := NewMergerClient(ts.URL, MergerConfig{CAFile: tokFile}); err == nil {
		t.Error("NewMerger accepted a CA file without certificates")
	}
	if _, err := NewMergerClient(ts.URL, MergerConfig{Client: ts.Client(), CAFile: caFile}); err == nil {
		t.Error("NewMerger accepted Client and CAFile together")
	}
	if _, err := NewMergerClient(ts.URL, MergerConfig{Token: "a\nb"}); err == nil {
		t.Error("NewMerger accepted a token with a newline")
	}
}

func TestStallAndUnreachable(t *testing.T) {
	release := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.ReadAll(r.Body)
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer ts.Close()
	defer close(release)
	m := newTestMerger(t, ts.URL, MergerConfig{StallTimeout: 100 * time.Millisecond})
	start := time.Now()
	err := m.Update(context.Background(), fixtureUUID, 0, [cowformat.BitfieldSize]byte{}, nil)
	if err == nil || !strings.Contains(err.Error(), "no progress") {
		t.Fatalf("stalled request: %v", err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("stall detected after %s", el)
	}
	if _, bp := BackPressure(err); bp {
		t.Fatal("a stall is not back-pressure")
	}

	m2 := newTestMerger(t, ts.URL, MergerConfig{Timeout: 100 * time.Millisecond, StallTimeout: -1})
	if err := m2.Merge(context.Background(), fixtureUUID, 1, 1); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("timed out request: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.Merge(ctx, fixtureUUID, 1, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}

	dead := httptest.NewServer(http.NotFoundHandler())
	addr := dead.URL
	dead.Close()
	m4 := newTestMerger(t, addr, MergerConfig{})
	if _, err := m4.Create(context.Background(), "img", 1); err == nil || !strings.Contains(err.Error(), "check that the merger runs") {
		t.Fatalf("unreachable: %v", err)
	}
}
