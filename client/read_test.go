package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
	"github.com/dnbd3go/dnbd3go/protocol"
)

func TestReadWholeImage(t *testing.T) {
	t.Parallel()
	data := genImage(4<<20+1000, 0) // not a multiple of 4 KiB
	srv := startServer(t, dnbd3test.Image{Name: "dir/test.img", RID: 7, Data: data})
	cfg := fastConfig(t, "dir/test.img", srv.Addr())
	cfg.MaxRequest = 256 << 10 // force splitting of the 1.5 MiB reads
	img := openT(t, cfg)
	want := padded(data)
	if img.Size() != int64(len(want)) || img.Name() != "dir/test.img" || img.RID() != 7 {
		t.Fatalf("Size/Name/RID = %d %q %d, want %d dir/test.img 7", img.Size(), img.Name(), img.RID(), len(want))
	}
	got := readAll(t, img, 1536<<10)
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatal("sha256 of the image differs")
	}
	st := img.Stats()
	if st.BytesRead != uint64(len(want)) || st.Current != srv.Addr() || st.Panic || st.Pending != 0 {
		t.Fatalf("stats after full read: %+v", st)
	}
	if srv.GetServers() != 1 {
		t.Errorf("GET_SERVERS sent %d times, want 1", srv.GetServers())
	}

	// io.ReaderAt semantics at the end.
	buf := make([]byte, 10000)
	n, err := img.ReadAt(buf, img.Size()-4000)
	if n != 4000 || err != io.EOF {
		t.Fatalf("read across the end = %d, %v; want 4000, EOF", n, err)
	}
	checkRange(t, want, buf[:n], img.Size()-4000)
	if n, err := img.ReadAt(buf, img.Size()); n != 0 || err != io.EOF {
		t.Fatalf("read at the end = %d, %v; want 0, EOF", n, err)
	}
	if _, err := img.ReadAt(buf, -1); err == nil {
		t.Fatal("negative offset accepted")
	}
	if n, err := img.ReadAt(nil, 5); n != 0 || err != nil {
		t.Fatalf("empty read = %d, %v", n, err)
	}
	// Unaligned small read.
	n, err = img.ReadAt(buf[:17], 12345)
	if n != 17 || err != nil {
		t.Fatalf("unaligned read = %d, %v", n, err)
	}
	checkRange(t, want, buf[:17], 12345)
	// Sections and io.SectionReader work on top.
	sum := sha256.New()
	if _, err := io.Copy(sum, io.NewSectionReader(img, 0, img.Size())); err != nil {
		t.Fatal(err)
	}
	if [32]byte(sum.Sum(nil)) != sha256.Sum256(want) {
		t.Fatal("SectionReader copy differs")
	}
}

func TestConcurrentReaders(t *testing.T) {
	t.Parallel()
	data := genImage(8<<20, 1)
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	cfg := fastConfig(t, "test", srv.Addr())
	cfg.MaxRequest = 64 << 10
	cfg.MaxInflight = 16 // exercise the local wait queue
	img := openT(t, cfg)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			buf := make([]byte, 300<<10)
			for range 40 {
				n := 1 + rng.IntN(len(buf))
				off := rng.Int64N(img.Size() - int64(n))
				if k, err := img.ReadAt(buf[:n], off); err != nil || k != n {
					errs <- err
					return
				}
				if string(buf[:n]) != string(data[off:off+int64(n)]) {
					errs <- errors.New("data mismatch")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestOutOfOrderRepliesAndHandleQuirk(t *testing.T) {
	t.Parallel()
	data := genImage(2<<20, 2)
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	srv.Update(func(b *dnbd3test.Behavior) { b.Reorder = 8 })
	cfg := fastConfig(t, "test", srv.Addr())
	cfg.MaxRequest = 16 << 10
	cfg.KeepaliveInterval = 5 * time.Millisecond // keepalive replies carry GET_BLOCK handles
	cfg.StallTimeout = 3 * time.Second           // this test is about reordering, not stalls (-race on a busy host is slow)
	img := openT(t, cfg)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 256<<10)
			for off := int64(g) * 4096; off+int64(len(buf)) <= img.Size(); off += 300 << 10 {
				if _, err := img.ReadAt(buf, off); err != nil {
					t.Error(err)
					return
				}
				if string(buf) != string(data[off:off+int64(len(buf))]) {
					t.Error("data mismatch")
					return
				}
			}
		}()
	}
	wg.Wait()
	eventually(t, 2*time.Second, "keepalives", func() bool { return srv.Keepalives() >= 3 })
	if _, err := img.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if st := img.Stats(); st.Failures != 0 || st.Failovers != 0 {
		t.Fatalf("connection failed during reordered reads: %+v", st)
	}
}

func TestRIDZeroResolution(t *testing.T) {
	t.Parallel()
	srv := startServer(t,
		dnbd3test.Image{Name: "img", RID: 1, Data: genImage(8192, 1)},
		dnbd3test.Image{Name: "img", RID: 3, Data: genImage(16384, 3)},
		dnbd3test.Image{Name: "img", RID: 2, Data: genImage(8192, 2)},
	)
	img := openT(t, fastConfig(t, "img", srv.Addr()))
	if img.RID() != 3 || img.Size() != 16384 {
		t.Fatalf("rid 0 resolved to %d (size %d), want 3 (16384)", img.RID(), img.Size())
	}
	checkRange(t, genImage(16384, 3), readAll(t, img, 4096), 0)

	cfg := fastConfig(t, "img", srv.Addr())
	cfg.RID = 2
	img2 := openT(t, cfg)
	if img2.RID() != 2 {
		t.Fatalf("rid = %d, want 2", img2.RID())
	}
	checkRange(t, genImage(8192, 2), readAll(t, img2, 4096), 0)
}

func TestOpenErrors(t *testing.T) {
	t.Parallel()
	srv := startServer(t, dnbd3test.Image{Name: "img", Data: genImage(8192, 0)})
	ctx := context.Background()

	_, err := Open(ctx, fastConfig(t, "nope", srv.Addr()))
	if !errors.Is(err, ErrImageNotFound) || !strings.Contains(err.Error(), `image "nope" rid latest not found on any of [`+srv.Addr()+"]") {
		t.Fatalf("unknown image: %v", err)
	}
	cfg := fastConfig(t, "img", srv.Addr())
	cfg.RID = 9
	if _, err := Open(ctx, cfg); !errors.Is(err, ErrImageNotFound) || !strings.Contains(err.Error(), "rid 9") {
		t.Fatalf("unknown rid: %v", err)
	}

	// Nothing listens on a closed server's port.
	dead := dnbd3test.Start(t)
	addr := dead.Addr()
	dead.Close()
	start := time.Now()
	_, err = Open(ctx, fastConfig(t, "img", addr))
	if !errors.Is(err, ErrNoServer) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("refused: %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("refused connection took %v", time.Since(start))
	}

	if _, err := Open(ctx, Config{Image: "x"}); err == nil {
		t.Fatal("no servers accepted")
	}
	if _, err := Open(ctx, Config{Servers: []string{"a"}, Image: "../x"}); err == nil {
		t.Fatal("bad image name accepted")
	}

	// An invalid handshake reply is not accepted.
	bad := startServer(t, dnbd3test.Image{Name: "img", Data: genImage(8192, 0)})
	bad.Update(func(b *dnbd3test.Behavior) { b.SizeOverride = 5000 })
	if _, err := Open(ctx, fastConfig(t, "img", bad.Addr())); !errors.Is(err, ErrNoServer) || !strings.Contains(err.Error(), "size 5000") {
		t.Fatalf("bad size: %v", err)
	}
	// The first server that answers wins; a dead one first does not matter.
	img := openT(t, fastConfig(t, "img", addr, srv.Addr()))
	if img.Stats().Current != srv.Addr() {
		t.Fatalf("current = %s", img.Stats().Current)
	}
}

func TestParseHostSpec(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		host string
		port uint16
		bad  bool
	}{
		{"host", "host", 5003, false},
		{"host:1234", "host", 1234, false},
		{"10.0.0.1", "10.0.0.1", 5003, false},
		{"10.0.0.1:99", "10.0.0.1", 99, false},
		{"::1", "::1", 5003, false},
		{"fe80::1", "fe80::1", 5003, false},
		{"[::1]", "::1", 5003, false},
		{"[::1]:5004", "::1", 5004, false},
		{"host:0", "", 0, true},
		{"host:99999", "", 0, true},
		{"[::1", "", 0, true},
		{":5", "", 0, true},
	} {
		h, p, err := parseHostSpec(tc.in)
		if tc.bad != (err != nil) || h != tc.host || p != tc.port {
			t.Errorf("parseHostSpec(%q) = %q, %d, %v", tc.in, h, p, err)
		}
	}
	list, err := resolveServers(context.Background(), []string{"127.0.0.1:1 127.0.0.1:2", "127.0.0.1:1", "[::1]:3"}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := serverKeys(list); got != "[127.0.0.1:1 127.0.0.1:2 [::1]:3]" {
		t.Fatalf("resolved %s", got)
	}
	list, err = resolveServers(context.Background(), []string{"localhost:7"}, testLogger(t))
	if err != nil || len(list) == 0 || len(list) > 2 {
		t.Fatalf("localhost: %v %v", serverKeys(list), err)
	}
}

func TestCRCList(t *testing.T) {
	t.Parallel()
	data := genImage(40<<20+10001, 0)
	srv := startServer(t,
		dnbd3test.Image{Name: "crc", Data: data, CRC: true},
		dnbd3test.Image{Name: "nocrc", Data: data[:8192]},
	)
	ctx := context.Background()
	img := openT(t, fastConfig(t, "crc", srv.Addr()))
	list, err := img.CRCList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := protocol.ComputeCRCList(bytes.NewReader(data), int64(len(data)))
	if len(list) != 3 || len(list) != len(want) {
		t.Fatalf("CRC list %x, want %x", list, want)
	}
	for k := range want {
		if list[k] != want[k] {
			t.Fatalf("CRC list %x, want %x", list, want)
		}
	}
	// A read after GET_CRC32 still works (replies dispatched by cmd).
	buf := make([]byte, 4096)
	if _, err := img.ReadAt(buf, 4096); err != nil {
		t.Fatal(err)
	}
	checkRange(t, padded(data), buf, 4096)

	img2 := openT(t, fastConfig(t, "nocrc", srv.Addr()))
	if list, err := img2.CRCList(ctx); list != nil || err != nil {
		t.Fatalf("no CRC: %v, %v", list, err)
	}
}

func TestContextCancelDrainsLateReply(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 4)
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	cfg := fastConfig(t, "test", srv.Addr())
	cfg.StallTimeout = 5 * time.Second
	img := openT(t, cfg)
	// The reply comes 2 s late; the read's context ends after 30 ms. The
	// read must return at its deadline, not with the reply (the bound
	// leaves room for a loaded machine).
	srv.Update(func(b *dnbd3test.Behavior) { b.BlockDelay = 2 * time.Second })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	buf := make([]byte, 64<<10)
	start := time.Now()
	_, err := img.ReadAtContext(ctx, buf, 0)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Fatalf("cancelled read: %v after %v", err, time.Since(start))
	}
	srv.Update(func(b *dnbd3test.Behavior) { b.BlockDelay = 0 })
	// The next read's reply comes after the late one, which is drained.
	if _, err := img.ReadAt(buf, 8192); err != nil {
		t.Fatal(err)
	}
	checkRange(t, data, buf, 8192)
	if st := img.Stats(); st.Failures != 0 {
		t.Fatalf("late reply of a cancelled read broke the connection: %+v", st)
	}
}

func TestReadAllocations(t *testing.T) {
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(1<<20, 0)})
	img := openT(t, fastConfig(t, "test", srv.Addr()))
	buf := make([]byte, 4096)
	img.ReadAt(buf, 0)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := img.ReadAt(buf, 8192); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 1 {
		t.Fatalf("%.1f allocations per 4 KiB ReadAt, want <= 1", allocs)
	}
}

func TestCloseFailsPendingReads(t *testing.T) {
	t.Parallel()
	srv := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(1<<20, 0)})
	cfg := fastConfig(t, "test", srv.Addr())
	cfg.StallTimeout = 10 * time.Second
	img, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv.Update(func(b *dnbd3test.Behavior) { b.StallBlocks = true })
	errs := make(chan error, 4)
	for k := range 4 {
		go func() {
			_, err := img.ReadAt(make([]byte, 4096), int64(k)*4096)
			errs <- err
		}()
	}
	eventually(t, 2*time.Second, "reads to be pending", func() bool { return img.Stats().Pending == 4 })
	img.Close()
	for range 4 {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Fatalf("pending read after Close: %v", err)
		}
	}
	if _, err := img.ReadAt(make([]byte, 10), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
	if _, err := img.CRCList(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("CRCList after Close: %v", err)
	}
	img.Close()
}
