package testutil

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// SHA256Of returns the hex sha256 of the file (or device) at path.
func SHA256Of(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// SHA256File returns the hex sha256 of the file (or device) at path; an
// error fails the test. Call it from the test's goroutine.
func SHA256File(t testing.TB, path string) string {
	t.Helper()
	sum, err := SHA256Of(path)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

// WaitListening dials the TCP address addr until a connection succeeds or
// within has passed; then it returns the last dial error.
func WaitListening(addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}
