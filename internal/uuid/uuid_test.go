package uuid

import (
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

func TestUUID(t *testing.T) {
	seen := make(map[string]bool)
	for i := 0; i < 1000; i++ {
		id := New()
		if len(id) != 36 || id[14] != '4' || !strings.ContainsRune("89ab", rune(id[19])) || strings.ToLower(id) != id || seen[id] {
			t.Fatalf("bad uuid %q", id)
		}
		if p, ok := Parse(id); !ok || p != id {
			t.Fatalf("parse %q: %q %v", id, p, ok)
		}
		seen[id] = true
	}
}

func TestParse(t *testing.T) {
	const canon = "0f8fad5b-d9cb-469f-a165-70867728950e"
	for _, in := range []string{
		canon,
		"0F8FAD5B-D9CB-469F-A165-70867728950E",
		"0f8fad5bd9cb469fa16570867728950e",
		"{0f8fad5b-d9cb-469f-a165-70867728950e}",
		"(0F8FAD5B-D9CB-469F-A165-70867728950E)",
	} {
		if got, ok := Parse(in); !ok || got != canon {
			t.Errorf("Parse(%q) = %q, %v", in, got, ok)
		}
	}
	for _, in := range []string{
		"", "x", canon + "0", canon[:35], "0f8fad5b-d9cb-469f-a165_70867728950e",
		"0f8fad5b-d9cb-469f-a165-70867728950g", "{" + canon + ")", "[" + canon + "]",
		"0f8fad5bd9cb469fa16570867728950", "-f8fad5bd9cb469fa16570867728950e-",
	} {
		if got, ok := Parse(in); ok {
			t.Errorf("Parse(%q) = %q, want an error", in, got)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("0f8fad5b-d9cb-469f-a165-70867728950e")
	f.Add("{0f8fad5b-d9cb-469f-a165-70867728950e}")
	f.Add("0f8fad5bd9cb469fa16570867728950e")
	f.Fuzz(func(t *testing.T, s string) {
		g, ok := Parse(s)
		if !ok {
			return
		}
		if len(g) != 36 || !testutil.UUID.MatchString(g) {
			t.Fatalf("Parse(%q) = %q", s, g)
		}
		if g2, ok := Parse(g); !ok || g2 != g {
			t.Fatalf("not canonical: %q -> %q", g, g2)
		}
	})
}
