package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

func httpGet(t *testing.T, addr, path string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, body
}

// shape lists the keys of a JSON document in order, with the path of each
// nested object, so two documents can be compared ignoring values.
func shape(t *testing.T, doc []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(doc))
	var out []string
	var walk func(path string) error
	walk = func(path string) error {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'):
			for dec.More() {
				k, _ := dec.Token()
				out = append(out, path+"."+k.(string))
				if err := walk(path + "." + k.(string)); err != nil {
					return err
				}
			}
			dec.Token()
		case json.Delim('['):
			for i := 0; dec.More(); i++ {
				if err := walk(path + "[]"); err != nil {
					return err
				}
			}
			dec.Token()
		}
		return nil
	}
	if err := walk(""); err != nil {
		t.Fatalf("bad JSON %s: %v", doc, err)
	}
	return out
}

// TestRPCMatchesReferenceOrigin sets up the captured origin (three images,
// two alt servers) and compares our /query output with the reference's:
// same keys in the same order, same spacing, same values where they do not
// depend on the run.
func TestRPCMatchesReferenceOrigin(t *testing.T) {
	base := crctestFiles(t)
	f, err := os.Create(filepath.Join(base, "bigsrc.r1"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(1610612736) // sparse, as in the capture
	f.Close()
	ts := startServer(t, base, "", map[string]string{"alt-servers": capturedAltServers})
	ref, err := os.ReadFile(testutil.Testdata(t, "rpc", "origin-query-all.json"))
	if err != nil {
		t.Fatal(err)
	}
	code, hdr, body := httpGet(t, ts.addr, "/query?q=stats&q=images&q=clients&q=space&q=version&q=altservers")
	if code != 200 || hdr.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("status %d, content type %q", code, hdr.Get("Content-Type"))
	}
	got, want := shape(t, body), shape(t, ref)
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("key order differs:\n got  %v\n want %v", got, want)
	}
	// spacing and the run-independent values: images (sorted by name) and altservers
	var g, w struct {
		Images     []map[string]any
		Altservers []map[string]any
	}
	json.Unmarshal(body, &g)
	json.Unmarshal(ref, &w)
	byName := func(list []map[string]any) map[string]map[string]any {
		m := map[string]map[string]any{}
		for _, it := range list {
			delete(it, "id")
			delete(it, "idle")
			m[it["name"].(string)] = it
		}
		return m
	}
	if gm, wm := byName(g.Images), byName(w.Images); fmt.Sprint(gm) != fmt.Sprint(wm) {
		t.Errorf("images:\n got  %v\n want %v", gm, wm)
	}
	if fmt.Sprint(g.Altservers) != fmt.Sprint(w.Altservers) {
		t.Errorf("altservers:\n got  %v\n want %v", g.Altservers, w.Altservers)
	}
	if !bytes.Contains(body, []byte(`"clients": [], "images": [{"id": 1, "name": "bigsrc", "wwn": 2848808253376182880, "rid": 1, "users": 0, "complete": 100, "idle": `)) {
		t.Errorf("spacing differs from the reference: %s", body)
	}
	// single items: runId first except after stats keys
	_, _, body = httpGet(t, ts.addr, "/query?q=version")
	if !bytes.HasPrefix(body, []byte(`{"runId": `)) || !bytes.Contains(body, []byte(`"version": "test", "build": "Release"}`)) {
		t.Errorf("q=version: %s", body)
	}
	_, _, body = httpGet(t, ts.addr, "/query?q=stats")
	if got := shape(t, body); strings.Join(got, " ") != ".bytesReceived .bytesSent .clientCount .serverCount .uptime .runId" {
		t.Errorf("q=stats keys %v", got)
	}
}

func TestRPCStatsClientsAndCommaList(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), testutil.GenImage(0, 65536))
	ts := startServer(t, base, "", nil)
	c := dial(t, ts.addr)
	handshake(t, c, "img", 1)
	send(t, c, protocol.Request{Cmd: protocol.CmdGetBlock, Size: 65536, Handle: 1}, nil)
	readReply(t, c)
	// comma lists are understood (the reference only knows repeated q=)
	_, _, body := httpGet(t, ts.addr, "/query?q=stats,clients")
	var v struct {
		BytesSent   uint64 `json:"bytesSent"`
		ClientCount int    `json:"clientCount"`
		Clients     []struct {
			Address   string `json:"address"`
			ImageID   int    `json:"imageId"`
			IsServer  int    `json:"isServer"`
			BytesSent uint64 `json:"bytesSent"`
		} `json:"clients"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatal(err)
	}
	if v.BytesSent != 65536 || v.ClientCount != 1 || len(v.Clients) != 1 || v.Clients[0].BytesSent != 65536 ||
		v.Clients[0].ImageID != 1 || v.Clients[0].Address != c.LocalAddr().String() {
		t.Fatalf("stats/clients: %s", body)
	}
}

func TestRPCShortRequestAndErrors(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "", nil)
	// a 23-byte request: the reference never answers it, we do
	c := dial(t, ts.addr)
	c.SetDeadline(time.Now().Add(3 * time.Second))
	c.Write([]byte("GET /query HTTP/1.0\r\n\r\n"))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("short request: %v %v", resp, err)
	}
	for path, want := range map[string]struct {
		code int
		body string
		ct   string
	}{
		"/cachemap?id=1":  {200, "\xff", "application/octet-stream; charset=utf-8"},
		"/cachemap?id=99": {404, "Image not found", "text/plain; charset=utf-8"},
		"/cachemap":       {400, "Missing parameter 'id'", "text/plain; charset=utf-8"},
		"/foo":            {404, "Nothing", "text/plain; charset=utf-8"},
	} {
		code, hdr, body := httpGet(t, ts.addr, path)
		if code != want.code || string(body) != want.body || hdr.Get("Content-Type") != want.ct {
			t.Errorf("%s: %d %q %q", path, code, body, hdr.Get("Content-Type"))
		}
		if hdr.Get("Connection") != "Keep-Alive" {
			t.Errorf("%s: Connection %q", path, hdr.Get("Connection"))
		}
	}
	if ref, _ := os.ReadFile(testutil.Testdata(t, "rpc", "cachemap-complete.bin")); !bytes.Equal(ref, []byte{0xff}) {
		t.Errorf("reference complete cachemap is %x", ref)
	}
	// HEAD starts with neither G nor P: closed without an answer
	c = dial(t, ts.addr)
	c.Write([]byte("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
	expectClosed(t, c, 5*time.Second)
	// logfile without a log file is null
	if _, _, body := httpGet(t, ts.addr, "/query?q=logfile"); !bytes.HasSuffix(body, []byte(`"logfile": null}`)) {
		t.Errorf("logfile: %s", body)
	}
}

// TestRPCACL checks the spec's table for `127.0.0.0/8 STATS IMAGE_LIST`.
func TestRPCACL(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "", map[string]string{"rpc.acl": "# dashboard\n127.0.0.0/8 STATS IMAGE_LIST\n"})
	for q, want := range map[string]int{
		"stats": 200, "images": 200, "version": 200, "space": 200,
		"clients": 403, "config": 403, "logfile": 403, "altservers": 403,
		"stats,clients": 403,
	} {
		code, _, body := httpGet(t, ts.addr, "/query?q="+q)
		if code != want {
			t.Errorf("q=%s: %d %s, want %d", q, code, body, want)
		}
		if q == "clients" && string(body) != "No permission to access client list" {
			t.Errorf("403 body %q", body)
		}
	}
	if code, _, _ := httpGet(t, ts.addr, "/cachemap?id=1"); code != 200 {
		t.Errorf("cachemap with IMAGE_LIST: %d", code)
	}
	// a host no rule matches gets nothing
	ts2 := startServer(t, base, "", map[string]string{"rpc.acl": "10.0.0.0/8 ALL\n"})
	if code, _, _ := httpGet(t, ts2.addr, "/query?q=stats"); code != 403 {
		t.Errorf("unmatched host: %d", code)
	}
	// ALL allows config
	ts3 := startServer(t, base, "", map[string]string{"rpc.acl": "127.0.0.1 ALL\n"})
	if code, _, body := httpGet(t, ts3.addr, "/query?q=config"); code != 200 || !bytes.Contains(body, []byte("basePath")) {
		t.Errorf("config with ALL: %d %s", code, body)
	}
}

// httpGetFrom is httpGet from the local address from.
func httpGetFrom(t *testing.T, addr, from, path string) (int, []byte) {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	cl := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}}
	resp, err := cl.Get("http://" + addr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

// TestRPCSlotsPerSource: 50 connections from one address that send half
// a request header (and would hold their slots for the header timeout)
// take at most maxHTTPClientsPerSource slots; the rest get 503 at once,
// and another address is still served.
func TestRPCSlotsPerSource(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "", nil)
	held, refused := 0, 0
	for range maxHTTPClients {
		c := dialFrom(t, ts.addr, "127.0.0.1")
		before := ts.rpc.active.Load()
		if _, err := c.Write([]byte("GET /query?q=stats HTTP/1.1\r\nHost: x\r\n")); err != nil {
			t.Fatal(err)
		}
		// either the server holds the connection (a slot more in use) or
		// it answers 503 and closes
		deadline := time.Now().Add(10 * time.Second)
		for {
			if ts.rpc.active.Load() > before {
				held++
				break
			}
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			if b, _ := io.ReadAll(c); bytes.HasPrefix(b, []byte("HTTP/1.1 503")) {
				refused++
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("connection %d neither held nor refused", held+refused)
			}
		}
	}
	if held != maxHTTPClientsPerSource || refused != maxHTTPClients-maxHTTPClientsPerSource {
		t.Errorf("one address holds %d RPC slots (%d refused), want %d", held, refused, maxHTTPClientsPerSource)
	}
	code, body := httpGetFrom(t, ts.addr, "127.0.0.2", "/query?q=stats")
	if code != http.StatusOK || !bytes.Contains(body, []byte(`"uptime"`)) {
		t.Fatalf("another address while one holds its slots: %d %q", code, body)
	}
}
