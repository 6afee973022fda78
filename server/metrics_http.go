package server

import (
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// rpcPaths are the label values of dnbd3_server_rpc_requests_total's path
// (anything else counts as "other": the label stays bounded).
var rpcPaths = map[string]string{
	"/query": "query", "/cachemap": "cachemap", "/metrics": "metrics",
	"/": "status", "/status.json": "status_json", "/status/map": "status_map", "/status.js": "status_asset", "/status.css": "status_asset",
}

// newMetrics builds the server's registry (its collector, the Go runtime
// and the process collector) and the RPC request counter.
func newMetrics(s *Server) (*prometheus.Registry, *prometheus.CounterVec) {
	reg := prometheus.NewRegistry()
	rpcReqs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dnbd3_server_rpc_requests_total",
		Help: "HTTP RPC requests (JSON RPC, metrics, status page) by path and status code.",
	}, []string{"path", "code"})
	reg.MustRegister(collector{s}, rpcReqs,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg, rpcReqs
}

// metricsHandler serves /metrics for callers with METRICS or STATS.
func (r *rpcServer) metrics(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.canScrape() {
		textReply(w, http.StatusForbidden, "No permission to access metrics")
		return
	}
	r.metricsHandler.ServeHTTP(w, req)
}

// statusRecorder remembers the status code of a response.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// countRPC counts a finished RPC request.
func (r *rpcServer) countRPC(path string, code int) {
	label, ok := rpcPaths[path]
	if !ok {
		label = "other"
	}
	if code == 0 {
		code = http.StatusOK
	}
	r.rpcReqs.WithLabelValues(label, strconv.Itoa(code)).Inc()
}
