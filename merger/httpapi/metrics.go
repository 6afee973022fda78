package httpapi

import (
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// apiMetrics are the HTTP layer's counters. They always exist; New
// registers them when Options.Metrics is set.
type apiMetrics struct {
	uploads   *prometheus.CounterVec // by outcome
	ingest    prometheus.Counter     // bytes of stored uploads
	responses *prometheus.CounterVec // by status code
	busy      prometheus.Counter     // 503 answers
}

func newAPIMetrics() *apiMetrics {
	return &apiMetrics{
		uploads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnbd3_merger_uploads_total",
			Help: "Cluster uploads (Update requests) by outcome: stored, busy (503, retry later), rejected (4xx), error (5xx).",
		}, []string{"outcome"}),
		ingest: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dnbd3_merger_ingest_bytes_total",
			Help: "Bytes of uploaded clusters stored (bitfield and blocks as received).",
		}),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnbd3_merger_http_responses_total",
			Help: "HTTP responses by status code.",
		}, []string{"code"}),
		busy: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dnbd3_merger_busy_responses_total",
			Help: "503 Service Unavailable answers (back pressure: uploads, merges, disk space, file descriptors).",
		}),
	}
}

func (m *apiMetrics) register(reg prometheus.Registerer) {
	reg.MustRegister(m.uploads, m.ingest, m.responses, m.busy)
}

// observe counts a finished request.
func (m *apiMetrics) observe(upload bool, code int) {
	m.responses.WithLabelValues(strconv.Itoa(code)).Inc()
	if code == http.StatusServiceUnavailable {
		m.busy.Inc()
	}
	if !upload {
		return
	}
	outcome := "stored"
	switch {
	case code == http.StatusServiceUnavailable:
		outcome = "busy"
	case code >= 500:
		outcome = "error"
	case code >= 400:
		outcome = "rejected"
	}
	m.uploads.WithLabelValues(outcome).Inc()
}

// metricsHandler returns the /metrics handler of reg.
func metricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
