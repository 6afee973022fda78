package server

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreateImage: the image appears complete with its all-zero `.map`
// and no temporary file; creating it again fails without touching the
// existing image or its map.
func TestCreateImage(t *testing.T) {
	base := t.TempDir()
	path, err := CreateImage(base, "lab/new", 3, 10001, true, false)
	if err != nil {
		t.Fatal(err)
	}
	if path != filepath.Join(base, "lab", "new.r3") {
		t.Fatalf("path %s", path)
	}
	if st, err := os.Stat(path); err != nil || st.Size() != 12288 {
		t.Fatalf("image: %v %v", st, err)
	}
	m, err := os.ReadFile(path + ".map")
	if err != nil || !bytes.Equal(m, []byte{0}) {
		t.Fatalf(".map %x %v", m, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 2 {
		t.Fatalf("files next to the image: %v", entries)
	}

	os.WriteFile(path+".map", []byte{0x0f}, 0o644) // partly filled by a proxy
	if _, err := CreateImage(base, "lab/new", 3, 4096, true, false); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second create: %v", err)
	}
	if st, _ := os.Stat(path); st.Size() != 12288 {
		t.Fatalf("existing image changed to %d bytes", st.Size())
	}
	if m, _ := os.ReadFile(path + ".map"); !bytes.Equal(m, []byte{0x0f}) {
		t.Fatalf("existing .map changed: %x", m)
	}
}
