package httpapi

import (
	"reflect"
	"testing"
)

func TestParseGUID(t *testing.T) {
	const canon = "0f8fad5b-d9cb-469f-a165-70867728950e"
	for _, in := range []string{
		canon,
		"0F8FAD5B-D9CB-469F-A165-70867728950E",
		"0f8fad5bd9cb469fa16570867728950e",
		"{0f8fad5b-d9cb-469f-a165-70867728950e}",
		"(0F8FAD5B-D9CB-469F-A165-70867728950E)",
	} {
		if got, ok := parseGUID(in); !ok || got != canon {
			t.Errorf("parseGUID(%q) = %q, %v", in, got, ok)
		}
	}
	for _, in := range []string{
		"", "x", canon + "0", canon[:35], "0f8fad5b-d9cb-469f-a165_70867728950e",
		"0f8fad5b-d9cb-469f-a165-70867728950g", "{" + canon + ")", "[" + canon + "]",
		"0f8fad5bd9cb469fa16570867728950", "-f8fad5bd9cb469fa16570867728950e-",
	} {
		if got, ok := parseGUID(in); ok {
			t.Errorf("parseGUID(%q) = %q, want an error", in, got)
		}
	}
}

func TestParseURLEncoded(t *testing.T) {
	got, err := parseURLEncoded("b=1&&A=x+y%2Fz&a=2&flag&=v")
	want := values{{"b", "1"}, {"A", "x y/z"}, {"a", "2"}, {"flag", ""}, {"", "v"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, %v", got, err)
	}
	if v, ok := got.get("a"); !ok || v != "x y/z" {
		t.Errorf(`get("a") = %q, %v: want the first, case-insensitively`, v, ok)
	}
	if _, ok := got.get("c"); ok {
		t.Error("get of a missing key")
	}
	if _, err := parseURLEncoded("a=%"); err == nil {
		t.Error("bad escape accepted")
	}
}

func TestBinderIntegers(t *testing.T) {
	b := binder{src: values{{"a", " 12 "}, {"b", "2147483648"}, {"c", "-1"}, {"d", "9223372036854775807"}, {"e", "0x10"}}}
	if n := b.int32("a", 0); n != 12 {
		t.Errorf("a = %d", n)
	}
	b.int32("b", 0)
	b.int32("c", 0)
	if n := b.int64("d", 0); n != 1<<63-1 {
		t.Errorf("d = %d", n)
	}
	b.int64("e", 0)
	b.int64("missing", 0)
	if len(b.errs) != 4 || b.errs["b"] == nil || b.errs["c"] == nil || b.errs["e"] == nil || b.errs["missing"][0] != "The missing field is required." {
		t.Errorf("errors = %v", b.errs)
	}
}

func FuzzParseGUID(f *testing.F) {
	f.Add("0f8fad5b-d9cb-469f-a165-70867728950e")
	f.Add("{0f8fad5b-d9cb-469f-a165-70867728950e}")
	f.Add("0f8fad5bd9cb469fa16570867728950e")
	f.Fuzz(func(t *testing.T, s string) {
		g, ok := parseGUID(s)
		if !ok {
			return
		}
		if len(g) != 36 || !bareGUID.MatchString(g) {
			t.Fatalf("parseGUID(%q) = %q", s, g)
		}
		if g2, ok := parseGUID(g); !ok || g2 != g {
			t.Fatalf("not canonical: %q -> %q", g, g2)
		}
	})
}

func FuzzParseURLEncoded(f *testing.F) {
	f.Add("revision=1&bitfieldSize=40&imageName=test")
	f.Add("a=%zz&b")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := parseURLEncoded(s)
		if err != nil {
			return
		}
		for _, fl := range v {
			if got, ok := v.get(fl.name); !ok {
				t.Fatalf("get(%q) = %q, %v", fl.name, got, ok)
			}
		}
	})
}
