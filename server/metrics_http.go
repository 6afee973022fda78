package server

import (
	"maps"
	"net/http"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
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

// metrics serves /metrics for callers with METRICS or STATS.
func (r *rpcServer) metrics(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.canScrape() {
		textReply(w, http.StatusForbidden, "No permission to access metrics")
		return
	}
	r.metricsHandler.ServeHTTP(w, req)
}

// countedRoutes wraps route once per path label of rpcPaths (and "other")
// in promhttp's counter by status code, curried with the label: a request
// pays one label lookup for its code.
func countedRoutes(rpcReqs *prometheus.CounterVec, route http.Handler) map[string]http.Handler {
	out := map[string]http.Handler{}
	for _, label := range append(slices.Collect(maps.Values(rpcPaths)), "other") {
		out[label] = promhttp.InstrumentHandlerCounter(rpcReqs.MustCurryWith(prometheus.Labels{"path": label}), route)
	}
	return out
}
