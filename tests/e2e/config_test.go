package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestServerCreateSizeSuffixes: --size takes the command-line size rules
// (K, M, G, T, optionally followed by iB or B: powers of 1024), not
// server.conf's (where a lower-case m means minutes), and a bad size names
// the value.
func TestServerCreateSizeSuffixes(t *testing.T) {
	base := t.TempDir()
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nsparseFiles=true\n"), 0o644)
	for i, tc := range []struct {
		size string
		want int64
	}{
		{"4M", 4 << 20},
		{"4MiB", 4 << 20},
		{"4m", 4 << 20},
		{"4G", 4 << 30},
		{"100000", 102400},
	} {
		rid := string(rune('1' + i))
		_, stderr, code := run(t, "dnbd3-server", "-c", etc, "--create", "img", "--revision", rid, "--size", tc.size)
		if code != 0 {
			t.Fatalf("--size %s: exit %d: %s", tc.size, code, stderr)
		}
		st, err := os.Stat(filepath.Join(base, "img.r"+rid))
		if err != nil || st.Size() != tc.want {
			t.Errorf("--size %s: created %v bytes (%v), want %d", tc.size, st.Size(), err, tc.want)
		}
	}
	_, stderr, code := run(t, "dnbd3-server", "-c", etc, "--create", "bad", "--revision", "1", "--size", "10Q")
	if code != 2 || !strings.Contains(stderr, `"10Q"`) {
		t.Errorf("--size 10Q: exit %d, stderr %q; want 2 and the bad value named", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(base, "bad.r1")); err == nil {
		t.Error("--size 10Q created an image")
	}
	_, stderr, code = run(t, "dnbd3-server", "-c", etc, "--create", "bad", "--size", "1M")
	if code != 2 || !strings.Contains(stderr, "--revision") {
		t.Errorf("--create without --revision: exit %d, stderr %q", code, stderr)
	}
}
