package httpapi

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
)

func TestUpdateSparseAndFull(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 1, merger.StateActive)

	bf, blocks := sparseBody(0, 1, 319)
	body := append(bf[:], blocks...)
	r := send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=7", "application/octet-stream", body)
	r.want(t, 200, "*", "")
	u, _ := f.lastUpdate()
	if u.uuid != id || u.u.Cluster != 7 || u.u.Full || u.u.Bitfield != bf || !bytes.Equal(u.u.Blocks, blocks) {
		t.Fatalf("sparse update = %s cluster %d full=%v bits=%x, %d bytes", u.uuid, u.u.Cluster, u.u.Full, u.u.Bitfield, len(u.u.Blocks))
	}

	// An empty bitfield without blocks reaches the Service, which decides.
	send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=0", "application/octet-stream", make([]byte, 40)).want(t, 200, "*", "")
	if u, _ := f.lastUpdate(); u.u.Full || len(u.u.Blocks) != 0 || u.u.Bitfield != [40]byte{} {
		t.Fatalf("empty update = %+v", u.u)
	}

	// A whole cluster (v1 and seed) is Full.
	full := make([]byte, cowformat.BitfieldSize+cowformat.ClusterSize)
	full[0] = 0x81
	for i := cowformat.BitfieldSize; i < len(full); i++ {
		full[i] = byte(i * 7)
	}
	for _, path := range []string{
		"/v1/file/update?uuid=" + id + "&clusterindex=9",
		"/api/File/Update?guid=" + id + "&blockNumber=9",
	} {
		send(t, srv, "POST", path, "application/octet-stream", full).want(t, 200, "*", "")
		u, _ := f.lastUpdate()
		if !u.u.Full || u.u.Cluster != 9 || u.u.Bitfield[0] != 0x81 || !bytes.Equal(u.u.Blocks, full[40:]) {
			t.Fatalf("%s: full update = cluster %d full=%v, %d bytes", path, u.u.Cluster, u.u.Full, len(u.u.Blocks))
		}
	}
	// The seed API takes only whole clusters.
	n := len(f.updates)
	send(t, srv, "POST", "/api/File/Update?guid="+id+"&blockNumber=1", "application/octet-stream", body).
		want(t, 400, "text/plain; charset=utf-8", "*")
	// Shorter than a bitfield.
	send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=1", "application/octet-stream", make([]byte, 39)).
		want(t, 400, "text/plain; charset=utf-8", "the update body is 39 bytes, shorter than the 40-byte bitfield")
	if len(f.updates) != n {
		t.Errorf("service called for invalid updates")
	}
}

// TestUpdateClientBodies replays the bodies the real dnbd3-fuse sent in
// the captured session (testdata/cow-session-v3/merger-uploads).
func TestUpdateClientBodies(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("test", 1, merger.StateActive)
	dir := filepath.Join(testutil.SharedDir(t), "testdata", "cow-session-v3", "merger-uploads")
	for _, c := range []struct {
		cluster, size, popcount int
	}{{0, 12328, 3}, {1, 12328, 3}, {6, 4136, 1}} {
		body, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("cluster-%d.bin", c.cluster)))
		if err != nil {
			t.Fatal(err)
		}
		if len(body) != c.size {
			t.Fatalf("fixture cluster-%d.bin is %d bytes", c.cluster, len(body))
		}
		send(t, srv, "POST", fmt.Sprintf("/v1/file/update?uuid=%s&clusterindex=%d", id, c.cluster), "application/octet-stream", body).want(t, 200, "*", "")
		u, _ := f.lastUpdate()
		pc := 0
		for _, b := range u.u.Bitfield {
			for ; b != 0; b &= b - 1 {
				pc++
			}
		}
		if u.u.Cluster != c.cluster || u.u.Full || pc != c.popcount || !bytes.Equal(u.u.Blocks, body[40:]) || !bytes.Equal(u.u.Bitfield[:], body[:40]) {
			t.Errorf("cluster %d: got cluster %d full=%v popcount %d", c.cluster, u.u.Cluster, u.u.Full, pc)
		}
	}
}

func TestUpdateParameters(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 1, merger.StateActive)
	body := make([]byte, 40)
	for _, c := range []struct {
		query string
		bad   []string
	}{
		{"", []string{"clusterindex", "uuid"}},
		{"uuid=" + id, []string{"clusterindex"}},
		{"clusterindex=1", []string{"uuid"}},
		{"uuid=not-a-guid&clusterindex=1", []string{"uuid"}},
		{"uuid=" + id + "x&clusterindex=1", []string{"uuid"}},
		{"uuid=" + id + "&clusterindex=-1", []string{"clusterindex"}},
		{"uuid=" + id + "&clusterindex=2147483648", []string{"clusterindex"}},
		{"uuid=" + id + "&clusterindex=1.5", []string{"clusterindex"}},
		{"uuid=" + id + "&clusterindex=", []string{"clusterindex"}},
		{"guid=" + id + "&blockNumber=1", []string{"clusterindex", "uuid"}},
	} {
		send(t, srv, "POST", "/v1/file/update?"+c.query, "application/octet-stream", body).wantProblem(t, c.bad...)
	}
	send(t, srv, "POST", "/api/file/update?uuid="+id+"&clusterindex=1", "application/octet-stream", body).
		wantProblem(t, "blockNumber", "guid")
	send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=%G1", "application/octet-stream", body).
		want(t, 400, "text/plain; charset=utf-8", "*")
	if len(f.updates) != 0 {
		t.Fatalf("service called for invalid updates: %d", len(f.updates))
	}
	// The largest int32 is a valid index for the HTTP layer.
	send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=2147483647", "application/octet-stream", body).want(t, 200, "*", "")
	if u, _ := f.lastUpdate(); u.u.Cluster != 2147483647 {
		t.Fatalf("cluster %d", u.u.Cluster)
	}
}

func TestUpdateContentType(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 1, merger.StateActive)
	path := "/v1/file/update?uuid=" + id + "&clusterindex=1"
	for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "application/octet-stream/x", "multipart/form-data; boundary=x"} {
		r := send(t, srv, "POST", path, ct, make([]byte, 40))
		r.want(t, 415, "text/plain; charset=utf-8", "*")
	}
	// 415 comes before parameter validation, as with [Consumes].
	send(t, srv, "POST", "/v1/file/update", "text/plain", make([]byte, 40)).want(t, 415, "*", "*")
	// Parameters on the media type are fine, and so is its case.
	send(t, srv, "POST", path, "Application/Octet-Stream; charset=binary", make([]byte, 40)).want(t, 200, "*", "")
	if len(f.updates) != 1 {
		t.Fatalf("updates = %d", len(f.updates))
	}
}

// TestUpdateTooLarge checks that a body over the limit is refused with
// 413 before it is read: the server answers while the client has sent
// only the headers.
func TestUpdateTooLarge(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 1, merger.StateActive)
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "POST /v1/file/update?uuid=%s&clusterindex=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n",
		id, MaxUpdateBytes+1)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "1310760") {
		t.Fatalf("got %d %q, want 413", resp.StatusCode, b)
	}

	// Chunked, without Content-Length: cut off at the limit.
	big := make([]byte, MaxUpdateBytes+1)
	path := "/v1/file/update?uuid=" + id + "&clusterindex=1"
	if code := postChunked(t, srv, path, "application/octet-stream", big); code != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked: %d, want 413", code)
	}
	// Exactly the limit, chunked, is fine.
	if code := postChunked(t, srv, path, "application/octet-stream", big[:MaxUpdateBytes]); code != 200 {
		t.Fatalf("chunked full cluster: %d, want 200", code)
	}
	if u, _ := f.lastUpdate(); len(f.updates) != 1 || !u.u.Full {
		t.Fatalf("updates %d full=%v", len(f.updates), u.u.Full)
	}

	// Forms are limited to 64 KiB.
	form := "imageName=" + strings.Repeat("a", MaxFormBytes) + "&revision=1&bitfieldSize=40"
	post(t, srv, "/v1/file/create", form).want(t, 413, "text/plain; charset=utf-8", "*")
	ct, body := multipartForm(t, "imageName", strings.Repeat("a", MaxFormBytes), "revision", "1", "bitfieldSize", "40")
	if code := postChunked(t, srv, "/v1/file/create", ct, body); code != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked multipart: %d, want 413", code)
	}
	if len(f.creates) != 0 {
		t.Fatalf("creates = %+v", f.creates)
	}
}

// postChunked POSTs body without Content-Length (chunked) and returns
// the reply's status code.
func postChunked(t *testing.T, srv *httptest.Server, path, ctype string, body []byte) int {
	t.Helper()
	req, err := http.NewRequest("POST", srv.URL+path, io.MultiReader(bytes.NewReader(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ctype)
	req.ContentLength = -1
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestUpdateExpectContinue sends updates with "Expect: 100-continue" over
// one kept-alive connection, as curl does for larger bodies.
func TestUpdateExpectContinue(t *testing.T) {
	var conns atomic.Int32
	f, srv := startWith(t, Options{Token: "s3cret"}, func(s *http.Server) {
		s.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		}
	})
	id := f.addSession("img", 1, merger.StateActive)
	tr := &http.Transport{ExpectContinueTimeout: 5 * time.Second}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	full := make([]byte, MaxUpdateBytes)
	for i := 0; i < 3; i++ {
		req, _ := http.NewRequest("POST", fmt.Sprintf("%s/v1/file/update?uuid=%s&clusterindex=%d", srv.URL, id, i), bytes.NewReader(full))
		req.Header.Set("Content-Type", "application/octet-stream")
		req.Header.Set("Expect", "100-continue")
		req.Header.Set("Authorization", "Bearer s3cret")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("update %d: %d", i, resp.StatusCode)
		}
	}
	if len(f.updates) != 3 || !f.updates[2].u.Full || f.updates[2].u.Cluster != 2 {
		t.Fatalf("updates = %d", len(f.updates))
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 3 requests, want 1 (keep-alive)", n)
	}
	// Without the token the body is never needed.
	req, _ := http.NewRequest("POST", srv.URL+"/v1/file/update?uuid="+id+"&clusterindex=1", bytes.NewReader(full))
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Expect", "100-continue")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || len(f.updates) != 3 {
		t.Fatalf("no token: %d, %d updates", resp.StatusCode, len(f.updates))
	}
}
