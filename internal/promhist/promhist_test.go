package promhist

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestBucketsAndFold puts durations into the right cumulative buckets and
// sums two histograms in a Snapshot.
func TestBucketsAndFold(t *testing.T) {
	var a, b Hist
	a.Observe(30 * time.Microsecond)  // <= 50 µs
	a.Observe(700 * time.Microsecond) // <= 1 ms
	a.Observe(time.Minute)            // +Inf
	b.Observe(-time.Second)           // counted as 0
	var s Snapshot
	s.Add(&a)
	s.Add(&b)
	if s.Count() != 4 {
		t.Fatalf("count %d", s.Count())
	}
	var m dto.Metric
	if err := s.Metric(prometheus.NewDesc("x_seconds", "x", nil, nil)).Write(&m); err != nil {
		t.Fatal(err)
	}
	h := m.Histogram
	want := map[float64]uint64{0.00005: 2, 0.0005: 2, 0.001: 3, 30: 3}
	for _, bk := range h.Bucket {
		if w, ok := want[bk.GetUpperBound()]; ok && bk.GetCumulativeCount() != w {
			t.Errorf("bucket %v: %d, want %d", bk.GetUpperBound(), bk.GetCumulativeCount(), w)
		}
	}
	if h.GetSampleCount() != 4 || h.GetSampleSum() < 60 || h.GetSampleSum() > 60.001 {
		t.Errorf("count %d sum %v", h.GetSampleCount(), h.GetSampleSum())
	}
}

// TestConstNeverPanics: invalid UTF-8 in a label value is replaced, a
// wrong number of labels gives an invalid metric, not a panic.
func TestConstNeverPanics(t *testing.T) {
	d := prometheus.NewDesc("x", "x", []string{"image"}, nil)
	var m dto.Metric
	if err := Const(d, prometheus.GaugeValue, 1, "bad\xffname").Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.Label[0].GetValue(); got != "bad\uFFFDname" {
		t.Errorf("label %q", got)
	}
	if err := Const(d, prometheus.GaugeValue, 1, "a", "b").Write(&m); err == nil {
		t.Error("two values for one label gave no error")
	}
	var s Snapshot
	if err := s.Metric(d).Write(&m); err == nil {
		t.Error("histogram without its label gave no error")
	}
}

// TestSampler lets through the 1st, (1+SampleEvery)th, ... request.
func TestSampler(t *testing.T) {
	var s Sampler
	var got []int
	for i := 1; i <= 3*SampleEvery; i++ {
		if s.Next() {
			got = append(got, i)
		}
	}
	if len(got) != 3 || got[0] != 1 || got[1] != 1+SampleEvery || got[2] != 1+2*SampleEvery {
		t.Errorf("sampled %v", got)
	}
}

// TestNowMonotonic: Now grows with time.
func TestNowMonotonic(t *testing.T) {
	a := Now()
	time.Sleep(2 * time.Millisecond)
	if d := Now() - a; d < 2*time.Millisecond || d > time.Minute {
		t.Errorf("Now moved by %v over a 2 ms sleep", d)
	}
}
