package server

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// latencyBounds are the upper bounds (seconds) of the read latency
// histogram buckets: 50 µs to 5 s, roughly ×2.5 apart.
var latencyBounds = [...]float64{
	0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
	0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
}

// latencyHist is a lock-free latency histogram with the fixed buckets
// latencyBounds. Each client connection has its own (no cache line shared
// between connections on the request path); the server folds them into
// its own when a connection ends. The zero value is ready to use.
type latencyHist struct {
	counts [len(latencyBounds) + 1]atomic.Uint64 // last: above every bound
	sumNs  atomic.Uint64
}

// observe records one duration.
func (h *latencyHist) observe(d time.Duration) {
	if d < 0 {
		d = 0
	}
	s := d.Seconds()
	i := 0
	for i < len(latencyBounds) && s > latencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(d))
}

// histSnapshot is a plain copy of a latencyHist that sums several.
type histSnapshot struct {
	counts [len(latencyBounds) + 1]uint64
	sumNs  uint64
}

// add adds h's current counts to s.
func (s *histSnapshot) add(h *latencyHist) {
	for i := range h.counts {
		s.counts[i] += h.counts[i].Load()
	}
	s.sumNs += h.sumNs.Load()
}

// fold moves h's counts into the server-wide histogram dst.
func (h *latencyHist) foldInto(dst *latencyHist) {
	for i := range h.counts {
		dst.counts[i].Add(h.counts[i].Load())
	}
	dst.sumNs.Add(h.sumNs.Load())
}

// metric returns s as a Prometheus histogram.
func (s *histSnapshot) metric(desc *prometheus.Desc, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(latencyBounds))
	var cum uint64
	for i, b := range latencyBounds {
		cum += s.counts[i]
		buckets[b] = cum
	}
	cum += s.counts[len(latencyBounds)]
	return prometheus.MustNewConstHistogram(desc, cum, float64(s.sumNs)/1e9, buckets, labels...)
}
