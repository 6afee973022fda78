// Package testutil holds helpers shared by the project's tests: locating
// ../shared (specs and captured reference data) and decoding the captured
// wire traffic.
package testutil

import (
	"os"
	"path/filepath"
	"testing"
)

// SharedDir returns the path of the shared directory that sits beside the
// repository (../shared), or $DNBD3GO_SHARED if set. The captured reference
// data is part of the specification, so a missing directory fails the test.
func SharedDir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("DNBD3GO_SHARED"); d != "" {
		return d
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			shared := filepath.Join(dir, "..", "shared")
			if _, err := os.Stat(filepath.Join(shared, "testdata")); err != nil {
				t.Fatalf("captured reference data not found at %s (clone the repository beside ../shared or set DNBD3GO_SHARED): %v", shared, err)
			}
			return shared
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// Testdata returns the path of a file below ../shared/testdata.
func Testdata(t testing.TB, elem ...string) string {
	t.Helper()
	return filepath.Join(append([]string{SharedDir(t), "testdata"}, elem...)...)
}
