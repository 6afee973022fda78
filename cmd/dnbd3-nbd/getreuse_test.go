package main

import (
	"bytes"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/protocol"
)

const hashBlock = protocol.HashBlockSize

// padded returns b padded with zeros to the 4 KiB-rounded size.
func padded(b []byte) []byte {
	return append(bytes.Clone(b), make([]byte, protocol.VirtualSize(int64(len(b)))-int64(len(b)))...)
}

// TestGetReuse: with --reuse, the hash blocks of the old file whose CRC
// matches the server's list are taken from it and only the others are
// fetched; the result is the new revision, also when the new revision
// is larger than the old file.
func TestGetReuse(t *testing.T) {
	newData := genImage(3*hashBlock + 5000) // 4 hash blocks, the last one short
	cases := []struct {
		name         string
		old          func() []byte
		fetched      int64 // MiB requested (1 MiB reads)
		fetchedBytes int64 // in the summary: 4 KiB-padded
		reused       string
	}{
		{"block 1 and the tail changed", func() []byte {
			old := bytes.Clone(newData)
			old[hashBlock+77] ^= 1
			old[len(old)-1] ^= 1
			return old
		}, 16 + 1, hashBlock + 8192, "reused 33554432 bytes (2 of 4 hash blocks)"},
		{"old file is shorter", func() []byte { return bytes.Clone(newData[:2*hashBlock-4096]) }, 16 + 16 + 1, 2*hashBlock + 8192,
			"reused 16777216 bytes (1 of 4 hash blocks)"},
		{"old file padded", func() []byte { return padded(newData) }, 0, 0, "reused 50339840 bytes (4 of 4 hash blocks)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", RID: 2, Data: newData, CRC: true})
			dir := t.TempDir()
			oldFile, out := filepath.Join(dir, "img.r1"), filepath.Join(dir, "img.r2")
			os.WriteFile(oldFile, c.old(), 0o644)
			code, _, stderr := runT(t, "get", "-h", srv.Addr(), "-i", "img", "-r", "2", "--reuse", oldFile, "-o", out, "-q", "--block-size", "1M")
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, padded(newData)) {
				t.Fatal("the output is not the new revision")
			}
			if !strings.Contains(stderr, c.reused) || !strings.Contains(stderr, "every hash block checked") {
				t.Errorf("summary %q, want %q", stderr, c.reused)
			}
			if want := fmt.Sprintf("fetched %d bytes;", c.fetchedBytes); !strings.Contains(stderr, want) {
				t.Errorf("summary %q, want %q", stderr, want)
			}
			// A read the client re-sends on a second connection (RTT
			// probe, stall on a loaded machine) counts twice; a hash block
			// taken from the server instead of the old file would be 16
			// reads more.
			extra := int64(0)
			if srv.Handshakes() > 1 {
				extra = 2
			}
			if got := srv.Blocks(); got < c.fetched || got > c.fetched+extra {
				t.Errorf("%d reads of 1 MiB on %d connections, want %d", got, srv.Handshakes(), c.fetched)
			}
		})
	}
}

// TestGetReuseWithoutCRCList: a server without a CRC list: a warning,
// everything is fetched, the result is right and the summary says that
// nothing was checked.
func TestGetReuseWithoutCRCList(t *testing.T) {
	data := genImage(hashBlock + 4096)
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", RID: 2, Data: data})
	dir := t.TempDir()
	oldFile, out := filepath.Join(dir, "old"), filepath.Join(dir, "new")
	os.WriteFile(oldFile, data, 0o644)
	code, _, stderr := runT(t, "get", "-h", srv.Addr(), "-i", "img", "-r", "2", "--reuse", oldFile, "-o", out, "-q")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("output differs")
	}
	if !strings.Contains(stderr, "no CRC list") || !strings.Contains(stderr, "reused 0 bytes") || !strings.Contains(stderr, "nothing checked") {
		t.Errorf("stderr %q", stderr)
	}
}

// TestGetReuseErrors: --reuse needs the whole image, an existing file,
// and not the output file.
func TestGetReuseErrors(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: genImage(8192), CRC: true})
	dir := t.TempDir()
	old := filepath.Join(dir, "old")
	os.WriteFile(old, genImage(8192), 0o644)
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--reuse", old, "--offset", "4096"}, 2, "whole images"},
		{[]string{"--reuse", old, "--length", "4096"}, 2, "whole images"},
		{[]string{"--reuse", filepath.Join(dir, "missing"), "-o", filepath.Join(dir, "x")}, 1, "no such file"},
		{[]string{"--reuse", old, "-o", old}, 1, "is the output file"},
		{[]string{"--reuse", dir, "-o", filepath.Join(dir, "y")}, 1, "not a regular file"},
	} {
		code, _, stderr := runT(t, append([]string{"get", "-h", srv.Addr(), "-i", "img", "-q"}, tc.args...)...)
		if code != tc.code || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d with %q", tc.args, code, stderr, tc.code, tc.msg)
		}
	}
	if b, _ := os.ReadFile(old); !bytes.Equal(b, genImage(8192)) {
		t.Error("the --reuse file was changed")
	}
}

// TestCRCCheckWriter: blocks pass only after their CRC checked out; a
// bad block is an error and is not written.
func TestCRCCheckWriter(t *testing.T) {
	data := genImage(2*hashBlock + 4096)
	list, _ := protocol.ComputeCRCList(bytes.NewReader(data), int64(len(data)))
	var out bytes.Buffer
	cw := &crcCheckWriter{w: &out, list: list, size: int64(len(data)), h: crc32.NewIEEE()}
	for off := 0; off < len(data); off += 3 << 20 { // writes across block boundaries
		if _, err := cw.Write(data[off:min(off+3<<20, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("output differs")
	}
	bad := bytes.Clone(data)
	bad[hashBlock+5] ^= 1
	out.Reset()
	cw = &crcCheckWriter{w: &out, list: list, size: int64(len(data)), h: crc32.NewIEEE()}
	_, err := cw.Write(bad)
	if err == nil || !strings.Contains(err.Error(), "hash block 1 ") || !strings.Contains(err.Error(), "fails its CRC check") {
		t.Fatalf("bad block: %v", err)
	}
	if out.Len() != hashBlock {
		t.Fatalf("%d bytes written, want only the good block 0", out.Len())
	}
}
