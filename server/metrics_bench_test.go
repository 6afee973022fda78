package server

import (
	"testing"
	"time"
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
			t0 := time.Now()
			cs.disk.Observe(time.Since(t0))
		}
	}
}
