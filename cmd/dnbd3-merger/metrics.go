package main

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metricsRegistry returns the registry served at /metrics: the merge
// engine's metrics (when svc collects any, as merger.Manager does), the
// Go runtime's and the process's; httpapi adds the API's counters.
func metricsRegistry(svc service) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if c, ok := svc.(prometheus.Collector); ok {
		reg.MustRegister(c)
	}
	return reg
}
