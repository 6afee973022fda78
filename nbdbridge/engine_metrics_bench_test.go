package nbdbridge

import (
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
)

// BenchmarkRequestLatencyMetric is what the latency metric adds to a
// request: for one in promhist.SampleEvery a clock read when it arrives,
// and one plus the histogram when its reply is written (compare with
// BenchmarkEngine*).
func BenchmarkRequestLatencyMetric(b *testing.B) {
	var st statCounters
	var s promhist.Sampler
	for b.Loop() {
		var start time.Duration
		if s.Next() {
			start = promhist.Now()
		}
		st.observe(wireCmdRead, start)
	}
}
