package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/server"
)

// runServer starts a dnbd3-server in-process on a random loopback port.
// stop closes its listener and every client connection, as a dying server
// would.
func runServer(t *testing.T, base string) (addr string, stop func()) {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\n"), 0o644)
	cfg, _, err := server.LoadConfig(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Options{ConfigDir: dir, Config: cfg, Logger: testutil.Logger(t), Version: "e2e"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := server.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return ln.Addr().String(), stop
}

func randomImage(t *testing.T, path string, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, uint64(size)))
	for i := 0; i < len(data); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < len(data); j++ {
			data[i+j] = byte(v >> (8 * j))
		}
	}
	os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return data
}

// readAll reads the whole image with parallel 1 MiB reads; after half of it
// arrived, halfway() runs once.
func readAll(t *testing.T, img *client.Image, halfway func()) []byte {
	t.Helper()
	size := img.Size()
	out := make([]byte, size)
	const chunk = 1 << 20
	var next, done atomic.Int64
	var once sync.Once
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				off := next.Add(chunk) - chunk
				if off >= size {
					return
				}
				n := min(chunk, size-off)
				if _, err := img.ReadAt(out[off:off+n], off); err != nil {
					errs <- err
					return
				}
				if done.Add(n) >= size/2 && halfway != nil {
					once.Do(halfway)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("read: %v", err)
	}
	return out
}

// TestReadBack64MiB reads a 64 MiB image from our server through the client
// library and compares checksums.
func TestReadBack64MiB(t *testing.T) {
	base := t.TempDir()
	data := randomImage(t, filepath.Join(base, "disk.img.r1"), 64<<20)
	addr, _ := runServer(t, base)
	img, err := client.Open(context.Background(), client.Config{Servers: []string{addr}, Image: "disk.img", Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Size() != 64<<20 || img.RID() != 1 || img.Name() != "disk.img" {
		t.Fatalf("opened %s:%d size %d", img.Name(), img.RID(), img.Size())
	}
	got := readAll(t, img, nil)
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatal("sha256 of the read image differs from the file")
	}
	if st := img.Stats(); st.BytesRead != 64<<20 || st.Current != addr {
		t.Errorf("stats: %+v", st)
	}
}

// TestFailoverMidRead serves the image from two servers and stops the one
// the client uses halfway through a full read: the read completes with the
// right bytes from the other.
func TestFailoverMidRead(t *testing.T) {
	base := t.TempDir()
	data := randomImage(t, filepath.Join(base, "disk.img.r3"), 64<<20)
	a, stopA := runServer(t, base)
	b, stopB := runServer(t, base)
	img, err := client.Open(context.Background(), client.Config{
		Servers: []string{a, b}, Image: "disk.img", Sticky: true, Deadline: 30 * time.Second, Logger: testutil.Logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var killed string
	got := readAll(t, img, func() {
		killed = img.Stats().Current
		if killed == a {
			stopA()
		} else {
			stopB()
		}
	})
	if !bytes.Equal(got, data) {
		t.Fatal("data read across the failover differs from the image")
	}
	st := img.Stats()
	if killed == "" || st.Current == killed || st.Failovers == 0 {
		t.Fatalf("killed %q, now on %q after %d failovers", killed, st.Current, st.Failovers)
	}
	t.Logf("killed %s mid-read, finished on %s (%d failovers)", killed, st.Current, st.Failovers)
}
