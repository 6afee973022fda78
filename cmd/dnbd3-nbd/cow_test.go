package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// serveInProcess runs `serve` with args until the returned stop is
// called; it waits until serve prints its address.
func serveInProcess(t *testing.T, args ...string) (stop func() (code int, stderr string)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	var errb testutil.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, append([]string{"serve"}, args...), stdio{in: strings.NewReader(""), out: pw, err: &errb})
		pw.Close()
	}()
	if _, err := bufio.NewReader(pr).ReadString('\n'); err != nil {
		cancel()
		t.Fatalf("serve printed no address: exit %d: %s", <-done, errb.String())
	}
	go io.Copy(io.Discard, pr)
	return func() (int, string) {
		cancel()
		select {
		case code := <-done:
			return code, errb.String()
		case <-time.After(30 * time.Second):
			t.Fatal("serve did not stop within 30 s")
			return 0, ""
		}
	}
}

// TestCOWFlagsCheckedBeforeSession: a bad -C, token file, CA file or
// --upload-uuid is a usage error reported before the session directory
// is touched, so the same command with the flag fixed then works.
func TestCOWFlagsCheckedBeforeSession(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", RID: 1, Data: genImage(2 << 20)})
	m := mergertest.Start(t)
	tmp := t.TempDir()
	notPEM := filepath.Join(tmp, "ca.pem")
	os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600)
	dir := t.TempDir()
	sock := filepath.Join(tmp, "nbd.sock")
	base := []string{"serve", "-h", srv.Addr(), "-i", "img", "--listen", "unix:" + sock, "-c", dir}
	for _, tc := range []struct {
		flags []string
		msg   string
	}{
		{[]string{"-C", "ftp://" + m.Addr}, `scheme "ftp"`},
		{[]string{"-C", "http://"}, "has no host"},
		{[]string{"-C", m.Addr, "--merger-token-file", filepath.Join(tmp, "missing")}, "token file"},
		{[]string{"-C", m.Addr, "--merger-ca", filepath.Join(tmp, "missing")}, "CA file"},
		{[]string{"-C", m.Addr, "--merger-ca", notPEM}, "no PEM certificate"},
		{[]string{"-C", m.Addr, "--upload-uuid", strings.Repeat("u", 37)}, "--upload-uuid"},
		{[]string{"--merger-token-file", notPEM}, "need the merger"},
	} {
		code, _, stderr := runT(t, append(base, tc.flags...)...)
		if code != exitUsage || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d with %q", tc.flags, code, stderr, exitUsage, tc.msg)
		}
		if left, _ := os.ReadDir(dir); len(left) != 0 {
			t.Fatalf("%v left %d file(s) in the session directory", tc.flags, len(left))
		}
	}
	stop := serveInProcess(t, append(base[1:], "-C", m.Addr)...)
	if code, stderr := stop(); code != exitOK {
		t.Fatalf("the same command with a good -C: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "meta")); err != nil {
		t.Fatalf("no session after a good start: %v", err)
	}
}

// TestFinalSummarySaysMerge: with -m the final summary says merge=true
// once the merge was requested, whether the merger accepted it or not.
func TestFinalSummarySaysMerge(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", RID: 1, Data: genImage(2 << 20)})
	for _, tc := range []struct {
		name   string
		merge  bool
		fault  *mergertest.Fault
		logged string
	}{
		{"accepted", true, nil, "merge=true mergeAccepted=true"},
		{"refused with 409", true, &mergertest.Fault{Status: 409, Body: "conflict: revision 2 of img already exists"}, "merge=true mergeAccepted=false"},
		{"no -m", false, nil, "merge=false mergeAccepted=false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := mergertest.Start(t)
			if tc.fault != nil {
				m.FailMerge(*tc.fault)
			}
			var logs testutil.Buffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			img, err := client.Open(t.Context(), client.Config{Servers: []string{srv.Addr()}, Image: "img", Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			c := &cowFlags{newDir: t.TempDir(), merger: m.Addr, merge: tc.merge, uploadDelay: time.Hour}
			if err := c.validate(); err != nil {
				t.Fatal(err)
			}
			cs, err := openCOW(t.Context(), c, img, log)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := cs.overlay.WriteAt(bytes.Repeat([]byte{1}, 4096), 0); err != nil {
				t.Fatal(err)
			}
			err = cs.finish(t.Context(), true)
			if (err != nil) != (tc.fault != nil) {
				t.Fatalf("finish: %v", err)
			}
			if !strings.Contains(logs.String(), tc.logged) {
				t.Fatalf("final summary lacks %q:\n%s", tc.logged, logs.String())
			}
		})
	}
}
