package main

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"testing"
)

const src = `package p

import (
	"errors"
	"fmt"
)

var errA = errors.New("p: fine")
var errB = errors.New("no prefix")

func f(err error) error {
	if err != nil {
		return fmt.Errorf("load session: %w", err)
	}
	_ = fmt.Errorf("p: step: %w", err)
	_ = fmt.Errorf("%s is bad", "x")
	_ = fmt.Errorf(format(), err)
	return fmt.Errorf("p: %d too large", 3)
}

func format() string { return "%w" }
`

// An origin error without the prefix and a wrapper with it are reported,
// with the literal the convention wants; a non-literal format is not.
func TestCheckFile(t *testing.T) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "p.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := checkFile(fset, f)
	want := []struct{ got, fix string }{
		{`"no prefix"`, `"p: no prefix"`},
		{`"p: step: %w"`, `"step: %w"`},
		{`"%s is bad"`, `"p: %s is bad"`},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d findings: %+v", len(got), got)
	}
	for i, w := range want {
		if got[i].got != w.got || got[i].fix != w.fix {
			t.Errorf("finding %d: %s -> %s, want %s -> %s", i, got[i].got, got[i].fix, w.got, w.fix)
		}
	}
}

// Package main is not checked: a command prints its name once.
func TestMainNotChecked(t *testing.T) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "m.go", "package main\nimport \"errors\"\nvar e = errors.New(\"bare\")\n", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := checkFile(fset, f); len(got) != 0 {
		t.Errorf("package main reported: %+v", got)
	}
}

// -fix rewrites the literals in place and leaves the rest of the file
// byte for byte; a second check then finds nothing.
func TestRewrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.go")
	if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := rewrite(checkFile(fset, f)); err != nil {
		t.Fatal(err)
	}
	fset = token.NewFileSet()
	f, err = parser.ParseFile(fset, path, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := checkFile(fset, f); len(got) != 0 {
		t.Errorf("after -fix: %+v", got)
	}
	b, _ := os.ReadFile(path)
	if want := len(src) + len("p: ")*2 - len("p: "); len(b) != want {
		t.Errorf("rewritten file is %d bytes, want %d:\n%s", len(b), want, b)
	}
}
