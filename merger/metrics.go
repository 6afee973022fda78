package merger

// Prometheus metrics of the merge engine. The Manager is a
// prometheus.Collector: session counts and free space are read when
// scraped; merges are counted as they end.

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// mergeStats counts finished merges.
type mergeStats struct {
	done, failed atomic.Uint64
	clusters     atomic.Uint64 // clusters applied by merges that finished
	duration     prometheus.Histogram
}

func newMergeStats() *mergeStats {
	return &mergeStats{duration: prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "dnbd3_merger_merge_duration_seconds",
		Help:    "Duration of merges that finished (done or failed), from their start to their end.",
		Buckets: []float64{0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600},
	})}
}

var (
	mdSessions = prometheus.NewDesc("dnbd3_merger_sessions", "Sessions by state.", []string{"state"}, nil)
	mdMerges   = prometheus.NewDesc("dnbd3_merger_merges_total", "Merges that ended, by outcome (done, failed).", []string{"outcome"}, nil)
	mdMerged   = prometheus.NewDesc("dnbd3_merger_merged_clusters_total", "Clusters applied by merges that finished.", nil, nil)
	mdFree     = prometheus.NewDesc("dnbd3_merger_free_disk_bytes", "Free bytes on the file system of a directory (working: sessions, destination: merged images).", []string{"directory"}, nil)
)

var allStates = []State{StateActive, StateCopying, StateMerging, StateDone, StateFailed}

// Describe sends the descriptions of the Manager's metrics.
func (m *Manager) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{mdSessions, mdMerges, mdMerged, mdFree} {
		ch <- d
	}
	m.stats.duration.Describe(ch)
}

// Collect sends the current values of the Manager's metrics.
func (m *Manager) Collect(ch chan<- prometheus.Metric) {
	count, _ := m.stateCounts()
	for _, st := range allStates {
		ch <- prometheus.MustNewConstMetric(mdSessions, prometheus.GaugeValue, float64(count[st]), string(st))
	}
	ch <- prometheus.MustNewConstMetric(mdMerges, prometheus.CounterValue, float64(m.stats.done.Load()), "done")
	ch <- prometheus.MustNewConstMetric(mdMerges, prometheus.CounterValue, float64(m.stats.failed.Load()), "failed")
	ch <- prometheus.MustNewConstMetric(mdMerged, prometheus.CounterValue, float64(m.stats.clusters.Load()))
	m.stats.duration.Collect(ch)
	for _, d := range []struct{ name, path string }{{"working", m.cfg.WorkingDirectory}, {"destination", m.cfg.DestinationDirectory}} {
		if free, err := freeSpace(d.path); err == nil {
			ch <- prometheus.MustNewConstMetric(mdFree, prometheus.GaugeValue, float64(free), d.name)
		}
	}
}

// stateCounts counts the sessions (those being deleted left out) by
// state, and in all.
func (m *Manager) stateCounts() (count map[State]int, total int) {
	count = map[State]int{}
	for _, s := range m.allSessions() {
		s.mu.Lock()
		if !s.deleted {
			count[s.meta.State]++
			total++
		}
		s.mu.Unlock()
	}
	return count, total
}

// recordMerge counts a merge that ended after it started at start.
func (m *Manager) recordMerge(s *session, start time.Time) {
	s.mu.Lock()
	state, merged := s.meta.State, s.meta.MergedClusters
	s.mu.Unlock()
	switch state {
	case StateDone:
		m.stats.done.Add(1)
		m.stats.clusters.Add(uint64(merged))
	case StateFailed:
		m.stats.failed.Add(1)
	default:
		return // interrupted by a shutdown: it resumes at the next start
	}
	m.stats.duration.Observe(time.Since(start).Seconds())
}

// Sessions returns every session, newest first (for the status page).
func (m *Manager) Sessions() []SessionInfo {
	var out []SessionInfo
	for _, s := range m.allSessions() {
		s.mu.Lock()
		if !s.deleted {
			out = append(out, s.info())
		}
		s.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b SessionInfo) int {
		return cmp.Or(b.Created.Compare(a.Created), cmp.Compare(a.UUID, b.UUID))
	})
	return out
}
