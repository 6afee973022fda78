// Command funcsize reports functions that are too long or too complex to
// read as a list of steps: more than -max-lines lines or a cyclomatic
// complexity above -max-complexity. It is run by `make vet` over the
// production code (test files, bench/ and generated code excluded) and
// exits 1 when any function is over a limit.
//
// Complexity is counted as gocyclo does: 1, plus one for each if, for,
// range, non-default case, select case, && and ||.
package main

import (
	"flag"
	"fmt"
	"go/ast"
	"go/token"
	"os"
	"sort"

	"github.com/dnbd3go/dnbd3go/internal/gosrc"
)

// finding is one function over a limit.
type finding struct {
	pos        token.Position
	name       string
	lines, cyc int
}

func main() {
	maxLines := flag.Int("max-lines", 80, "longest function body allowed, in lines")
	maxCyc := flag.Int("max-complexity", 20, "highest cyclomatic complexity allowed")
	top := flag.Int("top", 0, "also print the N longest and N most complex functions")
	flag.Parse()
	roots := flag.Args()
	if len(roots) == 0 {
		roots = []string{"."}
	}
	all, err := scan(roots)
	if err != nil {
		fmt.Fprintln(os.Stderr, "funcsize:", err)
		os.Exit(2)
	}
	if *top > 0 {
		printTop(all, *top)
	}
	bad := 0
	for _, f := range all {
		if f.lines > *maxLines || f.cyc > *maxCyc {
			fmt.Printf("%s: %s: %d lines, complexity %d (limits %d, %d)\n", f.pos, f.name, f.lines, f.cyc, *maxLines, *maxCyc)
			bad++
		}
	}
	if bad > 0 {
		fmt.Printf("funcsize: %d functions over the limits: split them into named steps\n", bad)
		os.Exit(1)
	}
}

// scan measures every production function under roots.
func scan(roots []string) ([]finding, error) {
	var all []finding
	err := gosrc.Walk(roots, func(fset *token.FileSet, _ string, f *ast.File) error {
		all = append(all, measureFile(fset, f)...)
		return nil
	})
	return all, err
}

// measureFile measures every function and method declared in f.
func measureFile(fset *token.FileSet, f *ast.File) []finding {
	var out []finding
	for _, decl := range f.Decls {
		fd, ok := decl.(*ast.FuncDecl)
		if !ok || fd.Body == nil {
			continue
		}
		start := fset.Position(fd.Pos())
		end := fset.Position(fd.End())
		out = append(out, finding{pos: start, name: funcName(fd), lines: end.Line - start.Line + 1, cyc: complexity(fd.Body)})
	}
	return out
}

// funcName is Name or (Recv).Name.
func funcName(fd *ast.FuncDecl) string {
	if fd.Recv == nil || len(fd.Recv.List) == 0 {
		return fd.Name.Name
	}
	t := fd.Recv.List[0].Type
	if s, ok := t.(*ast.StarExpr); ok {
		t = s.X
	}
	if ix, ok := t.(*ast.IndexExpr); ok {
		t = ix.X
	}
	if ix, ok := t.(*ast.IndexListExpr); ok {
		t = ix.X
	}
	if id, ok := t.(*ast.Ident); ok {
		return "(" + id.Name + ")." + fd.Name.Name
	}
	return fd.Name.Name
}

// complexity counts the decision points in body, function literals
// included (they are part of the function a reader reads).
func complexity(body ast.Node) int {
	c := 1
	ast.Inspect(body, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.IfStmt, *ast.ForStmt, *ast.RangeStmt:
			c++
		case *ast.CaseClause:
			if n.List != nil {
				c++
			}
		case *ast.CommClause:
			if n.Comm != nil {
				c++
			}
		case *ast.BinaryExpr:
			if n.Op == token.LAND || n.Op == token.LOR {
				c++
			}
		}
		return true
	})
	return c
}

// printTop prints the n longest and n most complex functions.
func printTop(all []finding, n int) {
	by := func(less func(a, b finding) bool, label string) {
		s := append([]finding(nil), all...)
		sort.Slice(s, func(i, j int) bool { return less(s[i], s[j]) })
		fmt.Printf("%s:\n", label)
		for _, f := range s[:min(n, len(s))] {
			fmt.Printf("  %4d lines  complexity %3d  %s %s\n", f.lines, f.cyc, f.pos, f.name)
		}
	}
	by(func(a, b finding) bool { return a.lines > b.lines }, "longest")
	by(func(a, b finding) bool { return a.cyc > b.cyc }, "most complex")
}
