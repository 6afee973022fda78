// Package promhist is a lock-free latency histogram with fixed buckets
// for hot paths, and constructors of Prometheus metrics that never panic.
// Observing costs one bucket search and two uncontended atomic adds; the
// histogram becomes a Prometheus const histogram only when scraped. Give
// each connection (or engine) its own Hist and sum them into a Snapshot at
// scrape time.
package promhist

import (
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
)

// bounds are the upper bounds (seconds) of the buckets: 50 µs to 30 s,
// roughly x2.5 apart.
var bounds = [...]float64{
	0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
	0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
}

// Hist is a latency histogram. The zero value is ready to use.
type Hist struct {
	counts [len(bounds) + 1]atomic.Uint64 // last: above every bound
	sumNs  atomic.Uint64
}

// Observe records one duration.
func (h *Hist) Observe(d time.Duration) {
	if d < 0 {
		d = 0
	}
	s := d.Seconds()
	i := 0
	for i < len(bounds) && s > bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(d))
}

// SampleEvery is how many requests a Sampler lets through one of: a clock
// read costs 60 to 150 ns on a virtual machine, a few percent of a 4 KiB
// read, so hot paths time one request in SampleEvery (the first, the
// 17th, ...). The counters of requests and bytes stay exact.
const SampleEvery = 16

// epoch is the origin of Now; set once when the program starts.
var epoch = time.Now()

// Now returns a monotonic timestamp for measuring durations (Now() -
// start). It reads only the monotonic clock: half the cost of time.Now,
// which also reads the wall clock.
func Now() time.Duration { return time.Since(epoch) }

// Sampler picks the requests to time. It is not safe for concurrent use:
// give each connection's request loop its own. The zero value is ready.
type Sampler struct{ n uint32 }

// Next reports whether to time the next request.
func (s *Sampler) Next() bool {
	s.n++
	return s.n%SampleEvery == 1
}

// Snapshot is a plain copy of one or more Hists.
type Snapshot struct {
	counts [len(bounds) + 1]uint64
	sumNs  uint64
}

// Add adds h's current counts to s.
func (s *Snapshot) Add(h *Hist) {
	for i := range h.counts {
		s.counts[i] += h.counts[i].Load()
	}
	s.sumNs += h.sumNs.Load()
}

// Count returns the number of observations.
func (s *Snapshot) Count() uint64 {
	var n uint64
	for _, c := range s.counts {
		n += c
	}
	return n
}

// Metric returns s as a Prometheus histogram of desc with the label
// values given.
func (s *Snapshot) Metric(desc *prometheus.Desc, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(bounds))
	var cum uint64
	for i, b := range bounds {
		cum += s.counts[i]
		buckets[b] = cum
	}
	cum += s.counts[len(bounds)]
	m, err := prometheus.NewConstHistogram(desc, cum, float64(s.sumNs)/1e9, buckets, validLabels(labels)...)
	if err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	return m
}

// Const is prometheus.MustNewConstMetric that never panics: label values
// that are not valid UTF-8 (image names come from file names and the
// network) get U+FFFD for the bad bytes, and any other error becomes an
// invalid metric, which the scrape reports instead of crashing the daemon.
func Const(desc *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) prometheus.Metric {
	m, err := prometheus.NewConstMetric(desc, t, v, validLabels(labels)...)
	if err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	return m
}

// validLabels replaces invalid UTF-8 in label values.
func validLabels(labels []string) []string {
	for i, l := range labels {
		if !utf8.ValidString(l) {
			labels[i] = strings.ToValidUTF8(l, "\uFFFD")
		}
	}
	return labels
}
