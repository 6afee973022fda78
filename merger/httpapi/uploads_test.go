package httpapi

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
)

// rawUpload is an upload sent by hand over its own connection.
type rawUpload struct {
	conn net.Conn
	br   *bufio.Reader
}

// beginUpload connects from the loopback address ip, sends the headers
// of a full-cluster upload to session id and the first sent bytes of
// its body.
func beginUpload(t *testing.T, srv *httptest.Server, ip, id string, sent int) *rawUpload {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "POST /v1/file/update?uuid=%s&clusterindex=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n",
		id, MaxUpdateBytes)
	if _, err := c.Write(make([]byte, sent)); err != nil {
		t.Fatal(err)
	}
	return &rawUpload{conn: c, br: bufio.NewReader(c)}
}

// finish sends the rest of the body.
func (u *rawUpload) finish(t *testing.T, sent int) {
	t.Helper()
	if _, err := u.conn.Write(make([]byte, MaxUpdateBytes-sent)); err != nil {
		t.Fatal(err)
	}
}

// reply reads the response (failing the test if none comes within
// within) and returns its status and Retry-After header.
func (u *rawUpload) reply(t *testing.T, within time.Duration) (int, string) {
	t.Helper()
	u.conn.SetReadDeadline(time.Now().Add(within))
	resp, err := http.ReadResponse(u.br, nil)
	if err != nil {
		t.Fatalf("no reply within %v: %v", within, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// noReply checks that no response arrives within d.
func (u *rawUpload) noReply(t *testing.T, d time.Duration) {
	t.Helper()
	u.conn.SetReadDeadline(time.Now().Add(d))
	if _, err := u.br.Peek(1); err == nil {
		t.Fatal("got a reply, want the upload to be still in progress")
	}
	u.conn.SetReadDeadline(time.Time{})
}

// TestUpdateRefusedBeforeBody is issue 10 item 11: an upload to an
// unknown or closed session is answered from its headers alone, without
// reading (and buffering) the announced 1.3 MB body.
func TestUpdateRefusedBeforeBody(t *testing.T) {
	f, srv := start(t, Options{})
	merging := f.addSession("img", 1, merger.StateMerging)
	for _, c := range []struct {
		id     string
		status int
	}{{"00000000-0000-4000-8000-000000000000", 404}, {merging, 409}} {
		u := beginUpload(t, srv, "127.0.0.1", c.id, 0)
		if status, _ := u.reply(t, 5*time.Second); status != c.status {
			t.Errorf("upload to %s: %d, want %d", c.id, status, c.status)
		}
	}
	if len(f.updates) != 0 {
		t.Errorf("Update called %d times", len(f.updates))
	}
}

// TestUploadBounds checks the bounds on uploads in progress: per client
// address (503 at once), in total (503 after waiting for a slot), and the
// read deadline that takes a stalled upload's slot back.
func TestUploadBounds(t *testing.T) {
	f := newFake()
	h := New(f, Options{Logger: testutil.Logger(t), MaxUploads: 2, MaxUploadsPerClient: 1, UploadTimeout: 2 * time.Second}).(*handler)
	h.uploads.wait = time.Second
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	id := f.addSession("img", 1, merger.StateActive)

	// One upload per client address: the second from .2 is refused at
	// once, while the first is in progress.
	a := beginUpload(t, srv, "127.0.0.2", id, 1000)
	a.noReply(t, 200*time.Millisecond)
	a2 := beginUpload(t, srv, "127.0.0.2", id, 0)
	if status, ra := a2.reply(t, 5*time.Second); status != 503 || ra == "" {
		t.Fatalf("second upload from one address: %d Retry-After %q, want 503 with Retry-After", status, ra)
	}

	// Two slots: .3 gets the second; .4 waits, and gets the slot .2
	// gives back when its upload completes.
	b := beginUpload(t, srv, "127.0.0.3", id, 0)
	b.noReply(t, 200*time.Millisecond)
	c := beginUpload(t, srv, "127.0.0.4", id, 0)
	c.noReply(t, 200*time.Millisecond)
	a.finish(t, 1000)
	if status, _ := a.reply(t, 5*time.Second); status != 200 {
		t.Fatalf("completed upload: %d", status)
	}
	c.finish(t, 0)
	if status, _ := c.reply(t, 5*time.Second); status != 200 {
		t.Fatalf("upload that waited for a slot: %d", status)
	}

	// All slots busy for longer than the wait: 503 with Retry-After.
	c2 := beginUpload(t, srv, "127.0.0.4", id, 0) // holds the slot c gave back
	c2.noReply(t, 200*time.Millisecond)
	d := beginUpload(t, srv, "127.0.0.5", id, 0)
	if status, ra := d.reply(t, 5*time.Second); status != 503 || ra == "" {
		t.Fatalf("upload while every slot is busy: %d Retry-After %q, want 503", status, ra)
	}

	// The stalled uploads (b, c2) run into the upload timeout and give
	// their slots back: their connections are closed, and uploads from
	// the same addresses go through again.
	for _, u := range []*rawUpload{b, c2} {
		u.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.Copy(io.Discard, u.br); err != nil && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("stalled upload: connection not closed by the server: %v", err)
		}
	}
	for _, ip := range []string{"127.0.0.3", "127.0.0.4"} {
		u := beginUpload(t, srv, ip, id, MaxUpdateBytes)
		if status, _ := u.reply(t, 5*time.Second); status != 200 {
			t.Fatalf("upload from %s after the stalled one timed out: %d", ip, status)
		}
	}
	if n := len(f.updates); n != 4 {
		t.Errorf("%d updates stored, want 4", n)
	}
	for _, u := range f.updates {
		if !u.u.Full || !bytes.Equal(u.u.Blocks, make([]byte, cowformat.ClusterSize)) {
			t.Errorf("stored update has %d bytes, full %v", len(u.u.Blocks), u.u.Full)
		}
	}
}
