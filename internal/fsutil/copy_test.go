package fsutil

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// TestCopyRange copies ranges between files at the same offset, leaving
// the rest of the destination alone; a source too short is an error.
func TestCopyRange(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	srcPath, dstPath := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	if err := os.WriteFile(srcPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{0xEE}, len(data))
	if err := os.WriteFile(dstPath, old, 0o644); err != nil {
		t.Fatal(err)
	}
	src, _ := os.Open(srcPath)
	defer src.Close()
	dst, _ := os.OpenFile(dstPath, os.O_WRONLY, 0)
	defer dst.Close()
	for _, r := range [][2]int64{{0, 4096}, {1 << 20, 1 << 20}, {3<<20 - 8192, 8192}} {
		how, err := CopyRange(dst, src, r[0], r[1])
		if err != nil {
			t.Fatalf("CopyRange(%d, %d): %v", r[0], r[1], err)
		}
		if how != CopyReflink && how != CopyFileRange && how != CopyStream {
			t.Fatalf("method %q", how)
		}
		copy(old[r[0]:r[0]+r[1]], data[r[0]:])
	}
	got, _ := os.ReadFile(dstPath)
	if !bytes.Equal(got, old) {
		t.Fatal("destination differs from the expected mix of copied and untouched ranges")
	}
	if _, err := CopyRange(dst, src, 3<<20-4096, 8192); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("copy past the source's end: %v, want io.ErrUnexpectedEOF", err)
	}
	if err := copyStream(dst, src, 3<<20-4096, 8192); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("streamed copy past the source's end: %v, want io.ErrUnexpectedEOF", err)
	}
}
