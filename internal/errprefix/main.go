// Command errprefix checks the project's one convention for error strings
// (issue 15), as the standard library spells them ("gzip: invalid
// header", "open /x: no such file or directory"):
//
//   - An error a package creates, errors.New("...") or fmt.Errorf without
//     %w, starts with the package's name and a colon: "cowstore: session
//     is closed". A reader of a log line knows where it came from.
//   - A wrapper, fmt.Errorf with %w, names the step that failed and not
//     the package: "load session: %w". The wrapped error already says
//     where it came from, so a chain reads "load session: cowstore: bad
//     magic", never "cowstore: load session: cowstore: bad magic".
//
// A message that a report prints after its own context is not an error of
// the package and has its own type: the server's badValue, printed after
// the configuration file, line and key it is about.
//
// Commands (package main) print their own name once, in main, and are
// not checked; neither are tests, bench/, tests/ and helper packages for
// tests (see internal/gosrc). Only literal format strings are checked.
// `make vet` runs it; -fix rewrites the literals that break the rules.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"go/ast"
	"go/token"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/dnbd3go/dnbd3go/internal/gosrc"
)

// finding is one error string that breaks the convention, with the
// literal that would follow it.
type finding struct {
	pos      token.Position
	off, end int // byte range of the literal in its file
	got, fix string
}

func main() {
	fix := flag.Bool("fix", false, "rewrite the literals in place")
	flag.Parse()
	roots := flag.Args()
	if len(roots) == 0 {
		roots = []string{"."}
	}
	var all []finding
	err := gosrc.Walk(roots, func(fset *token.FileSet, _ string, f *ast.File) error {
		all = append(all, checkFile(fset, f)...)
		return nil
	})
	if err == nil && *fix {
		err = rewrite(all)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "errprefix:", err)
		os.Exit(2)
	}
	if *fix || len(all) == 0 {
		return
	}
	for _, f := range all {
		fmt.Printf("%s: %s: want %s\n", f.pos, f.got, f.fix)
	}
	fmt.Printf("errprefix: %d error strings break the convention (see go doc ./internal/errprefix); -fix rewrites them\n", len(all))
	os.Exit(1)
}

// checkFile returns the error strings in f that break the convention.
func checkFile(fset *token.FileSet, f *ast.File) []finding {
	if f.Name.Name == "main" {
		return nil
	}
	prefix := f.Name.Name + ": "
	var out []finding
	ast.Inspect(f, func(n ast.Node) bool {
		lit, s, ok := errorString(n)
		if !ok {
			return true
		}
		want, ok := convention(s, prefix)
		if !ok {
			out = append(out, finding{
				pos: fset.Position(lit.Pos()), off: fset.Position(lit.Pos()).Offset, end: fset.Position(lit.End()).Offset,
				got: lit.Value, fix: strconv.Quote(want),
			})
		}
		return true
	})
	return out
}

// errorString matches errors.New("...") and fmt.Errorf("...", ...) with a
// literal first argument.
func errorString(n ast.Node) (*ast.BasicLit, string, bool) {
	call, ok := n.(*ast.CallExpr)
	if !ok || len(call.Args) == 0 {
		return nil, "", false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return nil, "", false
	}
	pkg, ok := sel.X.(*ast.Ident)
	if !ok || !(pkg.Name == "errors" && sel.Sel.Name == "New" || pkg.Name == "fmt" && sel.Sel.Name == "Errorf") {
		return nil, "", false
	}
	lit, ok := call.Args[0].(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return nil, "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return lit, s, err == nil
}

// convention returns s as the convention wants it and whether s already
// is: an origin error gains the prefix, a wrapper loses it.
func convention(s, prefix string) (string, bool) {
	has := strings.HasPrefix(s, prefix)
	if strings.Contains(s, "%w") {
		return strings.TrimPrefix(s, prefix), !has
	}
	return prefix + s, has
}

// rewrite replaces each finding's literal in its file.
func rewrite(all []finding) error {
	byFile := map[string][]finding{}
	for _, f := range all {
		byFile[f.pos.Filename] = append(byFile[f.pos.Filename], f)
	}
	for name, fs := range byFile {
		src, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		sort.Slice(fs, func(i, j int) bool { return fs[i].off > fs[j].off }) // from the end: offsets stay valid
		for _, f := range fs {
			src = bytes.Join([][]byte{src[:f.off], []byte(f.fix), src[f.end:]}, nil)
		}
		if err := os.WriteFile(name, src, 0o644); err != nil {
			return err
		}
	}
	return nil
}
