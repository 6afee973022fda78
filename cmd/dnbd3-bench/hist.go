package main

import (
	"math"
	"math/bits"
	"time"
)

// histogram records latencies in log-linear buckets: exact below 64 ns,
// then 64 buckets per power of two (relative error < 1.6 %). It is not
// safe for concurrent use; merge per-connection histograms instead.
type histogram struct {
	counts []uint64
	n      uint64
	sum    time.Duration
	max    time.Duration
	min    time.Duration
}

const subBits = 6 // 64 sub-buckets per power of two

func newHistogram() *histogram {
	return &histogram{counts: make([]uint64, (64-subBits+1)<<subBits)}
}

func bucketOf(v uint64) int {
	if v < 1<<subBits {
		return int(v)
	}
	e := bits.Len64(v) - 1 // v in [2^e, 2^(e+1))
	sub := (v >> (e - subBits)) & (1<<subBits - 1)
	return (e-subBits+1)<<subBits | int(sub)
}

// bucketUpper returns the largest value that falls into bucket b.
func bucketUpper(b int) uint64 {
	if b < 1<<subBits {
		return uint64(b)
	}
	e := b>>subBits + subBits - 1
	sub := uint64(b & (1<<subBits - 1))
	lower := uint64(1)<<e | sub<<(e-subBits)
	return lower + uint64(1)<<(e-subBits) - 1
}

// record adds one latency.
func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d))]++
	if h.n == 0 || d < h.min {
		h.min = d
	}
	h.n++
	h.sum += d
	h.max = max(h.max, d)
}

// merge adds o's samples to h.
func (h *histogram) merge(o *histogram) {
	if o.n == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.n += o.n
	h.sum += o.sum
	h.max = max(h.max, o.max)
}

// percentile returns the latency below or at which p percent of the
// samples fall (nearest rank, reported as the bucket's upper bound, capped
// at the maximum). It returns 0 without samples.
func (h *histogram) percentile(p float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(p / 100 * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for b, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(time.Duration(bucketUpper(b)), h.max)
		}
	}
	return h.max
}

// mean returns the average latency.
func (h *histogram) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return h.sum / time.Duration(h.n)
}
