package merger

import (
	"regexp"
	"strings"
	"testing"
)

var canonicalUUID = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

func TestUUID(t *testing.T) {
	seen := make(map[string]bool)
	for i := 0; i < 1000; i++ {
		id := newUUID()
		if len(id) != 36 || id[14] != '4' || !strings.ContainsRune("89ab", rune(id[19])) || strings.ToLower(id) != id || seen[id] {
			t.Fatalf("bad uuid %q", id)
		}
		if p, ok := ParseUUID(id); !ok || p != id {
			t.Fatalf("parse %q: %q %v", id, p, ok)
		}
		seen[id] = true
	}
}

func TestParseUUID(t *testing.T) {
	const canon = "0f8fad5b-d9cb-469f-a165-70867728950e"
	for _, in := range []string{
		canon,
		"0F8FAD5B-D9CB-469F-A165-70867728950E",
		"0f8fad5bd9cb469fa16570867728950e",
		"{0f8fad5b-d9cb-469f-a165-70867728950e}",
		"(0F8FAD5B-D9CB-469F-A165-70867728950E)",
	} {
		if got, ok := ParseUUID(in); !ok || got != canon {
			t.Errorf("ParseUUID(%q) = %q, %v", in, got, ok)
		}
	}
	for _, in := range []string{
		"", "x", canon + "0", canon[:35], "0f8fad5b-d9cb-469f-a165_70867728950e",
		"0f8fad5b-d9cb-469f-a165-70867728950g", "{" + canon + ")", "[" + canon + "]",
		"0f8fad5bd9cb469fa16570867728950", "-f8fad5bd9cb469fa16570867728950e-",
	} {
		if got, ok := ParseUUID(in); ok {
			t.Errorf("ParseUUID(%q) = %q, want an error", in, got)
		}
	}
}

func FuzzParseUUID(f *testing.F) {
	f.Add("0f8fad5b-d9cb-469f-a165-70867728950e")
	f.Add("{0f8fad5b-d9cb-469f-a165-70867728950e}")
	f.Add("0f8fad5bd9cb469fa16570867728950e")
	f.Fuzz(func(t *testing.T, s string) {
		g, ok := ParseUUID(s)
		if !ok {
			return
		}
		if len(g) != 36 || !canonicalUUID.MatchString(g) {
			t.Fatalf("ParseUUID(%q) = %q", s, g)
		}
		if g2, ok := ParseUUID(g); !ok || g2 != g {
			t.Fatalf("not canonical: %q -> %q", g, g2)
		}
	})
}
