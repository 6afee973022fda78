package httpapi

import (
	"fmt"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/promtest"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/prometheus/client_golang/prometheus"
)

// TestMetricsUploadsAndBusy stores two clusters, has one upload refused
// (unknown session) and one answered 503, and checks the counters, the
// ingest bytes and the token on /metrics.
func TestMetricsUploadsAndBusy(t *testing.T) {
	reg := prometheus.NewRegistry()
	f, srv := start(t, Options{Token: "s3cret", Metrics: reg})
	auth := []string{"Authorization", "Bearer s3cret"}
	id := f.addSession("img", 1, merger.StateActive)
	bf, blocks := sparseBody(0, 5)
	body := append(bf[:], blocks...)
	for c := range 2 {
		send(t, srv, "POST", fmt.Sprintf("/v1/file/update?uuid=%s&clusterindex=%d", id, c), "application/octet-stream", body, auth...).want(t, 200, "*", "")
	}
	send(t, srv, "POST", "/v1/file/update?uuid=00000000-0000-0000-0000-000000000001&clusterindex=0", "application/octet-stream", body, auth...)
	f.fail("update", &merger.BackPressureError{RetryAfter: 5e9, Reason: "test"})
	send(t, srv, "POST", "/v1/file/update?uuid="+id+"&clusterindex=3", "application/octet-stream", body, auth...).want(t, 503, "*", "*")

	if r := get(t, srv, "/metrics"); r.status != 401 {
		t.Errorf("/metrics without the token: %d", r.status)
	}
	s := promtest.Get(t, srv.URL+"/metrics", "s3cret")
	s.Promtool(t)
	for outcome, want := range map[string]float64{"stored": 2, "rejected": 1, "busy": 1, "error": 0} {
		if v, _ := s.Value("dnbd3_merger_uploads_total", "outcome", outcome); v != want {
			t.Errorf("uploads %s: %v, want %v", outcome, v, want)
		}
	}
	if v := s.Must(t, "dnbd3_merger_ingest_bytes_total"); v != float64(2*len(body)) {
		t.Errorf("ingest bytes %v, want %d", v, 2*len(body))
	}
	if v := s.Must(t, "dnbd3_merger_busy_responses_total"); v != 1 {
		t.Errorf("busy responses %v", v)
	}
	if v := s.Must(t, "dnbd3_merger_http_responses_total", "code", "401"); v != 1 {
		t.Errorf("401 responses %v", v)
	}
}

// TestMetricsOpenAndStatusPageAuth: OpenMetrics serves /metrics without
// the token; the status page still wants it, as Bearer or as the Basic
// password, and challenges browsers with Basic.
func TestMetricsOpenAndStatusPageAuth(t *testing.T) {
	f, srv := start(t, Options{Token: "tok", Metrics: prometheus.NewRegistry(), OpenMetrics: true, StatusPage: true, Version: "v-test"})
	f.addSession("lab/img", 3, merger.StateActive)
	get(t, srv, "/metrics")
	// the response counter has a sample once a request ended
	if r := get(t, srv, "/metrics"); r.status != 200 || !strings.Contains(r.body, `dnbd3_merger_http_responses_total{code="200"} 1`) {
		t.Errorf("open /metrics: %d %s", r.status, r.body)
	}
	r := get(t, srv, "/")
	if r.status != 401 || !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("page without the token: %d %q", r.status, r.header.Get("WWW-Authenticate"))
	}
	if r := get(t, srv, "/", "Authorization", "Basic dXNlcjp0b2s="); r.status != 200 || !strings.Contains(r.body, "<title>dnbd3-merger status</title>") {
		t.Errorf("page with Basic user:tok: %d", r.status)
	}
	if r := get(t, srv, "/", "Authorization", "Basic dXNlcjp3cm9uZw=="); r.status != 401 {
		t.Errorf("page with a wrong password: %d", r.status)
	}
	r = get(t, srv, "/status.json", "Authorization", "Bearer tok")
	if r.status != 200 || !strings.Contains(r.body, `"version":"v-test"`) || !strings.Contains(r.body, `"sessions":[]`) {
		t.Errorf("status.json (the fake lists no sessions): %d %s", r.status, r.body)
	}
	if r := post(t, srv, "/status.json", "", "Authorization", "Bearer tok"); r.status != 405 {
		t.Errorf("POST status.json: %d", r.status)
	}
}
