package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestLockFile: a second lock on the same file is refused and names the
// holder's PID; closing the first releases it.
func TestLockFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	f, err := LockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = LockFile(path)
	var le *LockedError
	if !errors.As(err, &le) || le.PID != os.Getpid() || le.Path != path {
		t.Fatalf("second lock: %v, want a LockedError naming PID %d", err, os.Getpid())
	}
	f.Close()
	f2, err := LockFile(path)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	f2.Close()
}
