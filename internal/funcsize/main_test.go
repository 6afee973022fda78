package main

import (
	"go/parser"
	"go/token"
	"testing"
)

// Complexity counts like gocyclo; lines include the signature and the
// closing brace; methods are named with their receiver.
func TestMeasure(t *testing.T) {
	const src = `package p

func simple() {}

func (t *T) branches(a, b bool, xs []int) int {
	if a && b || !a {
		return 1
	}
	for range xs {
	}
	switch {
	case a:
	case b:
	default:
	}
	return 0
}
`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "p.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := measureFile(fset, f)
	if len(got) != 2 {
		t.Fatalf("%d functions", len(got))
	}
	if got[0].name != "simple" || got[0].lines != 1 || got[0].cyc != 1 {
		t.Errorf("simple: %+v", got[0])
	}
	// 1 + if + && + || + range + 2 cases = 7
	if got[1].name != "(T).branches" || got[1].lines != 13 || got[1].cyc != 7 {
		t.Errorf("branches: %+v", got[1])
	}
}
