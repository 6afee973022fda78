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
	if err := CopyBuffered(dst, src, 3<<20-4096, 8192, false); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("streamed copy past the source's end: %v, want io.ErrUnexpectedEOF", err)
	}
}

// TestCopyBufferedSkipZeros leaves the all-zero pieces of the source
// unwritten with skipZeros (a truncated destination keeps them as holes)
// and writes them without it.
func TestCopyBufferedSkipZeros(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 3<<20) // 1 MiB pieces: data, zeros, data
	for i := range data[:1<<20] {
		data[i], data[2<<20+i] = byte(i%251+1), byte(i%241+1)
	}
	srcPath, dstPath := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	if err := os.WriteFile(srcPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	src, _ := os.Open(srcPath)
	defer src.Close()
	for _, skip := range []bool{true, false} {
		old := bytes.Repeat([]byte{0xEE}, len(data))
		if err := os.WriteFile(dstPath, old, 0o644); err != nil {
			t.Fatal(err)
		}
		dst, _ := os.OpenFile(dstPath, os.O_WRONLY, 0)
		err := CopyBuffered(dst, src, 0, int64(len(data)), skip)
		dst.Close()
		if err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(data)
		if skip {
			copy(want[1<<20:2<<20], old) // the zero piece was not written
		}
		if got, _ := os.ReadFile(dstPath); !bytes.Equal(got, want) {
			t.Fatalf("skipZeros=%v: destination differs", skip)
		}
	}
}
