package merger

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
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
			opt := MergeBenchmarkOptions{
				Dir:          b.TempDir(),
				OriginalSize: envMiB("MERGER_BENCH_ORIGINAL_MIB", 1024) << 20,
				ChangedSize:  envMiB("MERGER_BENCH_CHANGED_MIB", 256) << 20,
				CopyMethod:   method,
			}
			var sum MergeBenchmarkResult
			for i := 0; i < b.N; i++ {
				res, err := RunMergeBenchmark(b.Context(), opt)
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
	info, err := m.Create("up", 1, BitfieldSize)
	if err != nil {
		b.Fatal(err)
	}
	var bf [BitfieldSize]byte
	for i := 0; i < BitfieldSize; i += 4 {
		bf[i] = 0xff
	}
	blocks := make([]byte, 80*BlockSize)
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
