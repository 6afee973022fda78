package server

import (
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
)

// BenchmarkRequestMetrics is what the metrics add to one GET_BLOCK served
// from the file: the request counter and, for one request in
// promhist.SampleEvery, two clock reads and the latency histogram
// (compare with the cost of a request in BenchmarkRand4KiBQD32).
func BenchmarkRequestMetrics(b *testing.B) {
	var cs connStats
	for b.Loop() {
		cs.count(reqGetBlock)
		if cs.sampler.Next() {
			t0 := promhist.Now()
			cs.disk.Observe(promhist.Now() - t0)
		}
	}
}
