package testutil

import (
	"testing"

	"golang.org/x/sys/unix"
)

// AlignedBuf returns an n-byte page-aligned buffer for O_DIRECT I/O,
// unmapped when the test ends.
func AlignedBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}
