package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

func genImage(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*7 + 3) % 251)
	}
	return b
}

func runT(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, stdio{in: strings.NewReader(""), out: &out, err: &errb})
	return code, out.String(), errb.String()
}

func TestGetToFileAndStdout(t *testing.T) {
	data := genImage(5<<20 + 1234)
	want := make([]byte, (len(data)+4095)&^4095)
	copy(want, data)
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "test/img", RID: 4, Data: data})

	file := filepath.Join(t.TempDir(), "out.img")
	code, _, stderr := runT(t, "get", "-h", srv.Addr(), "-i", "test/img", "-o", file, "--block-size", "256K", "--parallel", "4")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got, err := os.ReadFile(file)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file content differs (len %d, want %d): %v", len(got), len(want), err)
	}
	if !strings.Contains(stderr, "test/img rid 4") || !strings.Contains(stderr, srv.Addr()) || !strings.Contains(stderr, "MB/s") {
		t.Fatalf("summary: %q", stderr)
	}

	code, stdout, stderr := runT(t, "get", "-h", "127.0.0.1:1 "+srv.Addr(), "-i", "test/img", "-r", "4", "--offset", "1M", "--length", "12345", "-q")
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if !bytes.Equal([]byte(stdout), want[1<<20:1<<20+12345]) {
		t.Fatalf("range content differs (len %d)", len(stdout))
	}
}

func TestGetErrors(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: genImage(8192)})
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"get", "-i", "img"}, 2, "required"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--offset", "x"}, 2, "--offset"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--parallel", "0"}, 2, "--parallel"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--log-format", "xml"}, 2, "log format"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--bogus"}, 2, "unknown flag"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "extra"}, 2, "unexpected argument"},
		{[]string{"get", "-h", srv.Addr(), "-i", "nope", "-o", filepath.Join(dir, "a")}, 1, `image "nope" rid latest not found`},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--offset", "8192", "-o", filepath.Join(dir, "b")}, 1, "beyond the end"},
		{[]string{"get", "-h", srv.Addr(), "-i", "img", "--length", "9000", "-o", filepath.Join(dir, "c")}, 1, "beyond the end"},
		{[]string{"frobnicate"}, 2, "unknown command"},
		{nil, 2, "Usage"},
	} {
		code, _, stderr := runT(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d with %q", tc.args, code, stderr, tc.code, tc.msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "b")); err == nil {
		t.Error("failed download left its output file behind")
	}
	code, stdout, _ := runT(t, "--help")
	if code != 0 || !strings.Contains(stdout, "get") {
		t.Errorf("--help: %d %q", code, stdout)
	}
	code, stdout, _ = runT(t, "get", "--help")
	if code != 0 || !strings.Contains(stdout, "--offset") {
		t.Errorf("get --help: %d %q", code, stdout)
	}
	code, stdout, _ = runT(t, "help", "get")
	if code != 0 || !strings.Contains(stdout, "--offset") {
		t.Errorf("help get: %d %q", code, stdout)
	}
}

func TestGetFailsWhenServerDies(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: genImage(32 << 20)})
	srv.Update(func(b *dnbd3test.Behavior) { b.BlockDelay = 20 * time.Millisecond })
	go func() {
		for srv.Blocks() < 4 {
			time.Sleep(time.Millisecond)
		}
		srv.Kill()
	}()
	file := filepath.Join(t.TempDir(), "out.img")
	start := time.Now()
	code, _, stderr := runT(t, "get", "-h", srv.Addr(), "-i", "img", "-o", file, "--timeout", "300ms", "--parallel", "2")
	if code != 1 || !strings.Contains(stderr, "deadline") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatalf("took %v", time.Since(start))
	}
	if _, err := os.Stat(file); err == nil {
		t.Fatal("partial output file left behind")
	}
}
