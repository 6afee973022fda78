package httpapi

import (
	"reflect"
	"testing"
)

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
