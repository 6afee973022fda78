package merger

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestManagerMetrics merges a session and checks the collected values:
// one Done session, one merge done, its clusters counted, one duration
// sample; an Active session counts as Active; the status line and
// Sessions list both.
func TestManagerMetrics(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(3, 4))
	original := randBytes(rng, 4<<20)
	e.original("img", 1, original)
	m := e.manager(nil)
	info, err := m.Create("img", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []int{0, 1, 2} {
		mustUpdate(t, m, info.UUID, randomUpload(rng, c, 0.3), false)
	}
	mergeDone(t, m, info.UUID, int64(len(original)), int64(len(original)))
	active, err := m.Create("img", 1, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	want := `
# HELP dnbd3_merger_merged_clusters_total Clusters applied by merges that finished.
# TYPE dnbd3_merger_merged_clusters_total counter
dnbd3_merger_merged_clusters_total 3
# HELP dnbd3_merger_merges_total Merges that ended, by outcome (done, failed).
# TYPE dnbd3_merger_merges_total counter
dnbd3_merger_merges_total{outcome="done"} 1
dnbd3_merger_merges_total{outcome="failed"} 0
`
	if err := testutil.CollectAndCompare(m, strings.NewReader(want), "dnbd3_merger_merged_clusters_total", "dnbd3_merger_merges_total"); err != nil {
		t.Error(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]float64{}
	var durations uint64
	var free int
	for _, f := range fams {
		for _, mt := range f.Metric {
			switch f.GetName() {
			case "dnbd3_merger_sessions":
				states[mt.Label[0].GetValue()] = mt.Gauge.GetValue()
			case "dnbd3_merger_merge_duration_seconds":
				durations = mt.Histogram.GetSampleCount()
			case "dnbd3_merger_free_disk_bytes":
				if mt.Gauge.GetValue() > 0 {
					free++
				}
			}
		}
	}
	if states["Done"] != 1 || states["Active"] != 1 || states["Failed"] != 0 {
		t.Errorf("sessions by state: %v", states)
	}
	if durations != 1 || free != 2 {
		t.Errorf("duration samples %d, free space gauges %d", durations, free)
	}
	if got, want := m.StatusLine(), "2 sessions: 1 active, 0 merging"; got != want {
		t.Errorf("StatusLine %q, want %q", got, want)
	}
	list := m.Sessions()
	if len(list) < 2 || list[0].UUID != active.UUID && list[1].UUID != active.UUID {
		t.Errorf("Sessions: %+v", list)
	}
}
