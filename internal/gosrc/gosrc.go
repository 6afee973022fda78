// Package gosrc walks the repository's production Go source for the
// checks `make vet` runs (internal/funcsize, internal/errprefix): test
// files, bench/, tests/, helper packages for tests (names ending in
// "test"), testdata, output and hidden directories and generated files
// are left out.
package gosrc

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strings"
)

// Walk parses every production Go file under roots, with comments, and
// calls fn for each; an error from parsing or from fn stops the walk.
func Walk(roots []string, fn func(fset *token.FileSet, path string, f *ast.File) error) error {
	fset := token.NewFileSet()
	for _, root := range roots {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if skipDir(path, root) {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
			if err != nil {
				return err
			}
			if ast.IsGenerated(f) {
				return nil
			}
			return fn(fset, path, f)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// skipDir leaves out what is not production code: tests' helper trees,
// benchmarks and hidden or output directories.
func skipDir(path, root string) bool {
	if path == root {
		return false
	}
	base := filepath.Base(path)
	switch {
	case strings.HasPrefix(base, ".") || strings.HasPrefix(base, "_"):
		return true
	case base == "testdata" || base == "out" || base == "bench" || base == "tests" || base == "vendor":
		return true
	case strings.HasSuffix(base, "test"): // helper packages for tests (dnbd3test, mergertest, ...)
		return true
	}
	return false
}
