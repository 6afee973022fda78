package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/dnbd3go/dnbd3go/merger/httpapi"
)

func TestLimitSettings(t *testing.T) {
	root, cwd := tree(t)
	file := filepath.Join(root, "limits.json")
	write := func(limits string) {
		t.Helper()
		content := `{"Settings": {"WorkingDirectory": "../../../WorkingDirectory", "OriginalImageDirectory": "../../../OriginalImageDirectory",
			"DestinationDirectory": "../../../Output"}, "Limits": {` + limits + `}}`
		if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Defaults without the section.
	write(``)
	c, err := configFor(t, cwd, "--settings", file)
	if err != nil {
		t.Fatal(err)
	}
	want := limits{maxUploads: httpapi.DefaultMaxUploads, maxUploadsPerClient: httpapi.DefaultMaxUploadsPerClient,
		uploadTimeout: time.Minute, maxConnections: defaultMaxConnections, maxSessions: merger.DefaultMaxSessions,
		maxSessionsPerImage: merger.DefaultMaxSessionsPerImage, maxOpenSessions: merger.DefaultMaxOpenSessions,
		abandonEmptyAfter: time.Hour}
	if c.limits != want {
		t.Errorf("defaults: %+v, want %+v", c.limits, want)
	}
	// Every key (numbers or strings, any case), and flags over the file.
	write(`"MaxUploads": 5, "maxuploadsperclient": "3", "UploadTimeout": "30s", "MaxConnections": 70,
		"MaxSessions": 12, "MaxSessionsPerImage": 4, "MaxOpenSessions": 6, "SessionQuota": "10G", "AbandonEmptyAfter": "2h",`)
	c, err = configFor(t, cwd, "--settings", file, "--max-sessions", "13", "--session-quota", "auto")
	if err != nil {
		t.Fatal(err)
	}
	want = limits{maxUploads: 5, maxUploadsPerClient: 3, uploadTimeout: 30 * time.Second, maxConnections: 70,
		maxSessions: 13, maxSessionsPerImage: 4, maxOpenSessions: 6, sessionQuota: 0, abandonEmptyAfter: 2 * time.Hour}
	if c.limits != want {
		t.Errorf("settings: %+v, want %+v", c.limits, want)
	}
	write(`"SessionQuota": "10G"`)
	if c, err = configFor(t, cwd, "--settings", file); err != nil || c.limits.sessionQuota != 10<<30 {
		t.Errorf("SessionQuota 10G: %d, %v", c.limits.sessionQuota, err)
	}
	// Mistakes name the key or the flag.
	for _, c := range []struct{ limits, want string }{
		{`"MaxUpload": 5`, "Limits.MaxUpload in " + file + ": unknown setting"},
		{`"MaxUploads": 0`, "Limits.MaxUploads"},
		{`"MaxUploads": 1.5`, "Limits.MaxUploads"},
		{`"UploadTimeout": "soon"`, "Limits.UploadTimeout"},
		{`"UploadTimeout": "0s"`, "Limits.UploadTimeout"},
		{`"SessionQuota": "1K"`, "Limits.SessionQuota"},
		{`"MaxSessions": [1]`, "Limits.MaxSessions"},
	} {
		write(c.limits)
		if _, err := configFor(t, cwd, "--settings", file); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", c.limits, err, c.want)
		}
	}
	write(``)
	for _, args := range [][]string{{"--max-uploads", "0"}, {"--upload-timeout", "x"}, {"--session-quota", "-1"}, {"--max-connections", "many"}} {
		_, err := configFor(t, cwd, append([]string{"--settings", file}, args...)...)
		if err == nil || !strings.Contains(err.Error(), args[0]) {
			t.Errorf("%v: %v", args, err)
		}
	}
}

func TestFitDescriptors(t *testing.T) {
	log := testutil.Logger(t)
	defaults := limits{maxOpenSessions: merger.DefaultMaxOpenSessions, maxConnections: defaultMaxConnections}
	// Plenty: unchanged.
	l := defaults
	if err := fitDescriptors(&l, 2, 1<<20, log); err != nil || l != defaults {
		t.Errorf("1M descriptors: %+v %v", l, err)
	}
	for _, nofile := range []uint64{60, 120, 1024} {
		l := defaults
		if err := fitDescriptors(&l, 2, nofile, log); err != nil {
			t.Fatalf("%d: %v", nofile, err)
		}
		need := fdReserve + 2*fdPerMerge + fdPerStore*l.maxOpenSessions + fdPerConn*l.maxConnections
		if uint64(need) > nofile || l.maxOpenSessions < 2 || l.maxConnections < 4 {
			t.Errorf("limit %d: %+v needs %d descriptors", nofile, l, need)
		}
	}
	l = defaults
	if err := fitDescriptors(&l, 2, 40, log); err == nil || !strings.Contains(err.Error(), "raise it") {
		t.Errorf("40 descriptors: %v", err)
	}
}

// TestConnectionLimit: connections beyond --max-connections get a 503
// with Retry-After and are closed; when one ends, the next is served.
func TestConnectionLimit(t *testing.T) {
	_, args := dirs(t)
	s := startRun(t, context.Background(), append(args, "--listen", "127.0.0.1:0", "--max-connections", "2"), newFakeEngine().open)
	addr := s.addrs[0].String()
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	time.Sleep(100 * time.Millisecond) // let the server accept them
	status := func() (*http.Response, error) {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET /v1/file/status?uuid=00000000-0000-4000-8000-000000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
		}
		return resp, err
	}
	resp, err := status()
	if err != nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || !resp.Close {
		t.Fatalf("third connection: %+v %v, want 503 with Retry-After and Connection: close", resp, err)
	}
	held[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err = status()
		if err == nil && resp.StatusCode == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a connection ended: %+v %v, want the request served (404)", resp, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	held[1].Close() // a connection without a request delays Shutdown by 5 s
	s.cancel()
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// FuzzLimitSettings: any Limits section is either taken or refused
// with an error, never a panic, and what is taken is within bounds.
func FuzzLimitSettings(f *testing.F) {
	f.Add(`{"MaxUploads": 5, "SessionQuota": "10G", "UploadTimeout": "1m"}`)
	f.Add(`{"maxsessions": "12", "AbandonEmptyAfter": "7d"}`)
	f.Add(`{"SessionQuota": auto}`)
	f.Fuzz(func(t *testing.T, section string) {
		var m map[string]json.RawMessage
		if json.Unmarshal([]byte(section), &m) != nil {
			return
		}
		var fl flags
		newFlagSet(&fl, io.Discard)
		l, err := buildLimits(fl.limits, fl.given, m, "fuzz")
		if err != nil {
			return
		}
		if l.maxUploads < 1 || l.maxUploadsPerClient < 1 || l.maxConnections < 1 || l.maxSessions < 1 ||
			l.maxSessionsPerImage < 1 || l.maxOpenSessions < 1 || l.uploadTimeout <= 0 || l.abandonEmptyAfter <= 0 ||
			(l.sessionQuota != 0 && l.sessionQuota < cowformat.ClusterSize) {
			t.Fatalf("%s gave %+v", section, l)
		}
	})
}

// TestSlotConnCloseWrite: a connection behind the limit still half-
// closes. net/http half-closes and drains a connection whose request
// body it did not read (an upload refused from its headers) so that the
// client gets the reply instead of a reset; the wrapper must pass
// CloseWrite through.
func TestSlotConnCloseWrite(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ll := &limitedListener{Listener: ln, slots: newConnSlots(1), plain: true}
	defer ll.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	srv, err := ll.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cw, ok := srv.(interface{ CloseWrite() error })
	if !ok {
		t.Fatal("the accepted connection has no CloseWrite")
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	client.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("client read after CloseWrite: %d %v, want EOF", n, err)
	}
	// Still open the other way.
	io.WriteString(client, "x")
	srv.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := srv.Read(make([]byte, 1)); n != 1 || err != nil {
		t.Fatalf("server read after its CloseWrite: %d %v", n, err)
	}
}
