package client

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// TestMain fails the run if goroutines are left over after all tests.
func TestMain(m *testing.M) {
	before := runtime.NumGoroutine()
	code := m.Run()
	if code == 0 {
		if err := waitGoroutines(before, 3*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// waitGoroutines waits until at most n goroutines run.
func waitGoroutines(n int, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		got := runtime.NumGoroutine()
		if got <= n {
			return nil
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			return fmt.Errorf("goroutine leak: %d running, want <= %d\n%s", got, n, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// genImage returns n bytes of a pattern that differs per image seed.
func genImage(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*7+3)%251) ^ seed
	}
	return b
}

// padded returns data rounded up to the 4 KiB virtual size with zeros.
func padded(data []byte) []byte {
	n := (len(data) + 4095) &^ 4095
	out := make([]byte, n)
	copy(out, data)
	return out
}

// testLogger logs through t.Log with -v and discards otherwise.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return testutil.Logger(t)
}

// fastConfig is a Config with short timeouts so failure tests run fast.
func fastConfig(t testing.TB, image string, servers ...string) Config {
	return Config{
		Servers:                servers,
		Image:                  image,
		OpenStagger:            30 * time.Millisecond,
		ConnectTimeout:         500 * time.Millisecond,
		StallTimeout:           250 * time.Millisecond,
		FailoverConnectTimeout: 300 * time.Millisecond,
		FailoverRetryMin:       20 * time.Millisecond,
		FailoverRetryMax:       100 * time.Millisecond,
		FailedServerDelay:      50 * time.Millisecond,
		TickInterval:           20 * time.Millisecond,
		NoProbe:                true,
		Logger:                 testLogger(t),
	}
}

func openT(t testing.TB, cfg Config) *Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	img, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func startServer(t testing.TB, images ...dnbd3test.Image) *dnbd3test.Server {
	t.Helper()
	return dnbd3test.Start(t, images...)
}

// startPair starts two servers that both serve data as image "test".
func startPair(t testing.TB, data []byte) (a, b *dnbd3test.Server) {
	t.Helper()
	return startServer(t, dnbd3test.Image{Name: "test", Data: data}), startServer(t, dnbd3test.Image{Name: "test", Data: data})
}

// readAll reads the whole image in chunks of chunk bytes.
func readAll(t testing.TB, img *Image, chunk int) []byte {
	t.Helper()
	out := make([]byte, img.Size())
	for off := 0; off < len(out); off += chunk {
		end := min(off+chunk, len(out))
		n, err := img.ReadAt(out[off:end], int64(off))
		if err != nil || n != end-off {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", end-off, off, n, err)
		}
	}
	return out
}

func checkRange(t testing.TB, want []byte, got []byte, off int64) {
	t.Helper()
	if !bytes.Equal(want[off:off+int64(len(got))], got) {
		t.Fatalf("data mismatch at offset %d (+%d bytes)", off, len(got))
	}
}

// eventually polls cond until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
