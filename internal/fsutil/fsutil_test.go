package fsutil

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileAtomicReplaces(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, want := range []string{"first", "second, longer content", "3"} {
		if err := WriteFileAtomic(p, []byte(want), 0o640); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != want {
			t.Fatalf("content %q (%v), want %q", got, err, want)
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v %v", fi.Mode(), err)
	}
	if _, err := os.Stat(p + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left behind: %v", err)
	}
}

func TestWriteFileAtomicErrors(t *testing.T) {
	if err := WriteFileAtomic(filepath.Join(t.TempDir(), "missing", "f"), nil, 0o644); err == nil {
		t.Fatal("no error for a missing directory")
	}
	if err := SyncDir(filepath.Join(t.TempDir(), "missing")); !os.IsNotExist(err) {
		t.Fatalf("SyncDir of a missing directory: %v", err)
	}
}

func TestRenameNoReplace(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("new"), 0o644)
	os.WriteFile(b, []byte("old"), 0o644)
	if err := RenameNoReplace(a, b); err != ErrDestExists {
		t.Fatalf("rename over an existing file: %v", err)
	}
	if got, _ := os.ReadFile(b); string(got) != "old" {
		t.Fatalf("destination replaced: %q", got)
	}
	os.Remove(b)
	if err := RenameNoReplace(a, b); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(b); string(got) != "new" {
		t.Fatalf("renamed content %q", got)
	}
	if _, err := os.Stat(a); !os.IsNotExist(err) {
		t.Fatalf("source still there: %v", err)
	}
}

// ReplaceFile leaves the new content with the requested mode and no
// temporary file; DiskSpace and Fdatasync work on a real file system.
func TestReplaceFileDiskSpaceFdatasync(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "status")
	if err := os.WriteFile(path+".tmp", []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := ReplaceFile(path, []byte("state=done\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "state=done\n" {
		t.Fatalf("content %q, %v", b, err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left: %v", err)
	}
	free, total, err := DiskSpace(dir)
	if err != nil || free <= 0 || total < free {
		t.Fatalf("DiskSpace: free %d total %d, %v", free, total, err)
	}
	if _, _, err := DiskSpace(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("DiskSpace of a missing path succeeded")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Fdatasync(f); err != nil {
		t.Fatal(err)
	}
}

// TestWriteFileSync truncates and rewrites with os.O_TRUNC (giving an
// existing file perm) and refuses an existing file with os.O_EXCL,
// leaving it as it was.
func TestWriteFileSync(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("old, longer content"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileSync(p, []byte("new"), os.O_TRUNC, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(p); err != nil || string(got) != "new" {
		t.Fatalf("content %q (%v), want %q", got, err, "new")
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v %v", fi.Mode(), err)
	}
	if err := WriteFileSync(p, []byte("other"), os.O_EXCL, 0o644); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("exclusive write over an existing file: %v, want fs.ErrExist", err)
	}
	if got, err := os.ReadFile(p); err != nil || string(got) != "new" {
		t.Fatalf("after the refused write: content %q (%v), want %q", got, err, "new")
	}
}
