package merger

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// BenchmarkMerge merges 256 MiB of changed clusters into a 1 GiB
// original (override with MERGER_BENCH_ORIGINAL_MIB and
// MERGER_BENCH_CHANGED_MIB). Besides ns/op (uploads + merge) it reports
// the merge's phases in ms and its throughput over the output size.
func BenchmarkMerge(b *testing.B) {
	for _, method := range []CopyMethod{CopyAuto, CopyStream} {
		name := string(method)
		if method == CopyAuto {
			name = "auto"
		}
		b.Run(name, func(b *testing.B) {
			opt := mergeBenchOptions{
				Dir:          b.TempDir(),
				OriginalSize: envMiB("MERGER_BENCH_ORIGINAL_MIB", 1024) << 20,
				ChangedSize:  envMiB("MERGER_BENCH_CHANGED_MIB", 256) << 20,
				CopyMethod:   method,
			}
			var sum mergeBenchResult
			for i := 0; i < b.N; i++ {
				res, err := runMergeBenchmark(b.Context(), opt)
				if err != nil {
					b.Fatal(err)
				}
				b.Log(res)
				sum.Upload += res.Upload
				sum.Merge += res.Merge
				sum.Copy += res.Copy
				sum.Apply += res.Apply
				sum.Finalize += res.Finalize
				sum.OriginalSize = res.OriginalSize
				sum.ChangedSize = res.ChangedSize
			}
			n := float64(b.N)
			b.ReportMetric(float64(sum.Merge.Milliseconds())/n, "merge-ms")
			b.ReportMetric(float64(sum.Copy.Milliseconds())/n, "copy-ms")
			b.ReportMetric(float64(sum.Apply.Milliseconds())/n, "apply-ms")
			b.ReportMetric(float64(sum.OriginalSize)/(1<<20)/(sum.Merge.Seconds()/n), "merge-MiB/s")
			b.ReportMetric(float64(sum.ChangedSize)/(1<<20)/(sum.Upload.Seconds()/n), "upload-MiB/s")
		})
	}
}

func envMiB(name string, def int64) int64 {
	if v, err := strconv.ParseInt(os.Getenv(name), 10, 64); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkUpload measures durable uploads of sparse clusters (80 of 320
// blocks) from parallel clients into one session.
func BenchmarkUpload(b *testing.B) {
	root := b.TempDir()
	for _, d := range []string{"work", "orig", "dest"} {
		os.Mkdir(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "orig", "up.r1"), nil, 0o644)
	m, err := NewManager(Config{WorkingDirectory: filepath.Join(root, "work"),
		OriginalImageDirectory: filepath.Join(root, "orig"), DestinationDirectory: filepath.Join(root, "dest")})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	info, err := m.Create("up", 1, cowformat.BitfieldSize)
	if err != nil {
		b.Fatal(err)
	}
	var bf [cowformat.BitfieldSize]byte
	for i := 0; i < cowformat.BitfieldSize; i += 4 {
		bf[i] = 0xff
	}
	blocks := make([]byte, 80*cowformat.BlockSize)
	rand.NewChaCha8([32]byte{}).Read(blocks)
	b.SetBytes(int64(len(blocks)))
	b.SetParallelism(4)
	var next atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c := int(next.Add(1) % 4096)
			if err := m.Update(info.UUID, Update{Cluster: c, Bitfield: bf, Blocks: blocks}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// mergeBenchOptions configures runMergeBenchmark.
type mergeBenchOptions struct {
	// Dir is a scratch directory (it must exist). The benchmark creates
	// orig/, work/ and dest/ in it and keeps orig/bench.r1 between runs
	// of the same OriginalSize.
	Dir string
	// OriginalSize is the size of the original image (default 1 GiB).
	OriginalSize int64
	// ChangedSize is how much of it the session rewrites, in whole
	// clusters spread evenly over the image (default 256 MiB).
	ChangedSize int64
	// CopyMethod is the Manager's copy method (default CopyAuto).
	CopyMethod CopyMethod
	// Uploaders is the number of concurrent uploads (default 4).
	Uploaders int
	// Logger receives the Manager's log (default: discarded).
	Logger *slog.Logger
}

// mergeBenchResult is what one runMergeBenchmark measured.
type mergeBenchResult struct {
	OriginalSize int64
	ChangedSize  int64 // bytes uploaded (whole clusters)
	Clusters     int
	Upload       time.Duration // all uploads, durable
	Copy         time.Duration // merge phase 1: the original into the temporary file
	Apply        time.Duration // merge phase 2: the clusters, up to the fsync of the result
	Finalize     time.Duration // finalize record, rename, directory fsync, Done
	Merge        time.Duration // from the Merge call until Done
}

func (r mergeBenchResult) String() string {
	mbps := func(n int64, d time.Duration) float64 { return float64(n) / (1 << 20) / d.Seconds() }
	return fmt.Sprintf("original %d MiB, %d clusters (%d MiB) changed: upload %v (%.0f MiB/s), merge %v (%.0f MiB/s of output): copy %v, apply+fsync %v, finalize %v",
		r.OriginalSize>>20, r.Clusters, r.ChangedSize>>20, r.Upload.Round(time.Millisecond), mbps(r.ChangedSize, r.Upload),
		r.Merge.Round(time.Millisecond), mbps(r.OriginalSize, r.Merge),
		r.Copy.Round(time.Millisecond), r.Apply.Round(time.Millisecond), r.Finalize.Round(time.Millisecond))
}

// runMergeBenchmark measures one session end to end: it uploads
// ChangedSize bytes of whole clusters into a session based on an
// OriginalSize random image and merges it, timing each phase. The merged
// revision is deleted afterwards. The numbers depend on the file system
// and its cache.
func runMergeBenchmark(ctx context.Context, opt mergeBenchOptions) (mergeBenchResult, error) {
	if opt.OriginalSize <= 0 {
		opt.OriginalSize = 1 << 30
	}
	if opt.ChangedSize <= 0 {
		opt.ChangedSize = 256 << 20
	}
	if opt.Uploaders <= 0 {
		opt.Uploaders = 4
	}
	var res mergeBenchResult
	res.OriginalSize = opt.OriginalSize
	orig, work, dest := filepath.Join(opt.Dir, "orig"), filepath.Join(opt.Dir, "work"), filepath.Join(opt.Dir, "dest")
	for _, d := range []string{orig, work, dest} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return res, err
		}
	}
	if err := benchOriginal(filepath.Join(orig, "bench.r1"), opt.OriginalSize); err != nil {
		return res, err
	}
	out := filepath.Join(dest, "bench.r2")
	if err := os.Remove(out); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, err
	}
	defer os.Remove(out)

	m, err := NewManager(Config{WorkingDirectory: work, OriginalImageDirectory: orig, DestinationDirectory: dest,
		CopyMethod: opt.CopyMethod, Logger: opt.Logger})
	if err != nil {
		return res, err
	}
	var mu sync.Mutex
	marks := make(map[string]time.Time)
	m.hook = func(point, _ string) error {
		mu.Lock()
		marks[point] = time.Now()
		mu.Unlock()
		return nil
	}
	defer m.Close()
	if err := m.Start(ctx); err != nil {
		return res, err
	}
	info, err := m.Create("bench", 1, cowformat.BitfieldSize)
	if err != nil {
		return res, err
	}

	clusters := int(min(opt.ChangedSize/cowformat.ClusterSize, (opt.OriginalSize+cowformat.ClusterSize-1)/cowformat.ClusterSize))
	res.Clusters = clusters
	res.ChangedSize = int64(clusters) * cowformat.ClusterSize
	step := (opt.OriginalSize + cowformat.ClusterSize - 1) / cowformat.ClusterSize / int64(max(clusters, 1))
	var all [cowformat.BitfieldSize]byte
	for i := range all {
		all[i] = 0xff
	}
	start := time.Now()
	work1 := make(chan int)
	errc := make(chan error, opt.Uploaders)
	var wg sync.WaitGroup
	for w := 0; w < opt.Uploaders; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.NewChaCha8([32]byte{byte(w)})
			blocks := make([]byte, cowformat.ClusterSize)
			rng.Read(blocks)
			for c := range work1 {
				blocks[0], blocks[1] = byte(c), byte(c>>8)
				if err := m.Update(info.UUID, Update{Cluster: c, Bitfield: all, Blocks: blocks}); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
feed:
	for i := 0; i < clusters; i++ {
		select {
		case work1 <- int(int64(i) * step):
		case err := <-errc:
			errc <- err
			break feed
		case <-ctx.Done():
			break feed
		}
	}
	close(work1)
	wg.Wait()
	select {
	case err := <-errc:
		return res, err
	default:
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.Upload = time.Since(start)

	start = time.Now()
	if _, err := m.Merge(info.UUID, opt.OriginalSize, opt.OriginalSize); err != nil {
		return res, err
	}
	for {
		st, err := m.Status(info.UUID)
		if err != nil {
			return res, err
		}
		if st.State == StateFailed {
			return res, fmt.Errorf("merge failed: %s", st.Error)
		}
		if st.State == StateDone {
			break
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	done := time.Now()
	res.Merge = done.Sub(start)
	mu.Lock()
	res.Copy = marks[hookCopied].Sub(start)
	res.Apply = marks[hookSynced].Sub(marks[hookCopied])
	res.Finalize = done.Sub(marks[hookSynced])
	mu.Unlock()
	return res, nil
}

// benchOriginal creates a random image of size bytes at path unless one
// of that size is there.
func benchOriginal(path string, size int64) error {
	if st, err := os.Stat(path); err == nil && st.Size() == size {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	rng := rand.NewChaCha8([32]byte{42})
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), size-off)]
		rng.Read(p)
		if _, err := f.Write(p); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
