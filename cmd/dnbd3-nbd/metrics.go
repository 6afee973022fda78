package main

// --metrics-listen ADDR: Prometheus metrics of attach and serve at
// http://ADDR/metrics (off by default): the NBD engine's requests, bytes
// and latencies, the DNBD3 client's server, RTT and failovers, and the
// copy-on-write session's dirty clusters, uploads and merge.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/promhist"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/pflag"
)

// addMetricsFlag defines --metrics-listen.
func addMetricsFlag(fs *pflag.FlagSet, addr *string) {
	fs.StringVar(addr, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9310 (off by default; no authentication: keep it on loopback or a trusted network)")
}

// Merge states of a copy-on-write session (label of dnbd3_nbd_cow_merge_state).
const (
	mergeNone         = "none"          // the session is in use
	mergeFinalUpload  = "final_upload"  // detached: uploading the rest (then merging with -m)
	mergeNotRequested = "not_requested" // final upload ended, no -m
	mergeAccepted     = "accepted"      // the merger accepted the merge
	mergeFailed       = "failed"        // -m, but no merge was accepted
)

var mergeStates = []string{mergeNone, mergeFinalUpload, mergeNotRequested, mergeAccepted, mergeFailed}

func mergeOutcome(requested, accepted bool) string {
	switch {
	case !requested:
		return mergeNotRequested
	case accepted:
		return mergeAccepted
	}
	return mergeFailed
}

// syncString is a string guarded by a mutex; the zero value is "".
type syncString struct {
	mu sync.Mutex
	v  string
}

func (s *syncString) Store(v string) { s.mu.Lock(); s.v = v; s.mu.Unlock() }

func (s *syncString) Load() string { s.mu.Lock(); defer s.mu.Unlock(); return s.v }

// bridgeCollector reads the metrics of one device or export at scrape
// time.
type bridgeCollector struct {
	device string                   // device path, or "serve:" + listen address
	engine func() *nbdbridge.Engine // nil result: not attached yet
	img    *client.Image
	cow    *cowSession // nil: read-only
}

func ndesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("dnbd3_nbd_"+name, help, append([]string{"device"}, labels...), nil)
}

var (
	nInfo        = ndesc("info", "The image a device or export serves (always 1).", "image", "rid")
	nRequests    = ndesc("requests_total", "NBD requests answered successfully, by command.", "command")
	nErrors      = ndesc("request_errors_total", "NBD requests answered with an error (invalid or failed in the backend).")
	nBackendErrs = ndesc("backend_errors_total", "NBD requests the backend (DNBD3 read or copy-on-write store) failed.")
	nReadBytes   = ndesc("read_bytes_total", "Payload bytes of successful NBD reads.")
	nWriteBytes  = ndesc("written_bytes_total", "Payload bytes of successful NBD writes.")
	nLatency     = ndesc("request_duration_seconds", "Time from reading an NBD request to writing its reply, by command (one request in 16 per connection is timed).", "command")
	nInFlight    = ndesc("requests_in_flight", "NBD requests read and not yet answered.")
	nConns       = ndesc("connections", "NBD connections served now (kernel socketpairs or clients).")
	nSwitches    = ndesc("server_switches_total", "Changes of the DNBD3 server: rtt (to a faster one) or failover (after a lost or stalled connection).", "reason")
	nConnFails   = ndesc("server_connection_failures_total", "Failed connections to DNBD3 servers.")
	nRTT         = ndesc("server_rtt_seconds", "Round-trip time of the current DNBD3 server.")
	nUp          = ndesc("server_connected", "1 while a DNBD3 server is connected, 0 while failing over.")
	nFetched     = ndesc("server_read_bytes_total", "Bytes read from DNBD3 servers.")
	nPending     = ndesc("server_reads_pending", "Reads waiting for a DNBD3 server (queued or in flight).")
	nDirty       = ndesc("cow_dirty_clusters", "Copy-on-write clusters changed and not uploaded yet.")
	nQueue       = ndesc("cow_upload_queue_clusters", "Dirty clusters old enough to be uploaded now.")
	nActive      = ndesc("cow_uploads_in_flight", "Upload requests to the merger running now.")
	nUploads     = ndesc("cow_uploads_total", "Cluster uploads by outcome: stored, failed, busy (the merger asked to slow down).", "outcome")
	nUpBytes     = ndesc("cow_uploaded_bytes_total", "Bytes uploaded to the merger (bitfield and blocks).")
	nMerge       = ndesc("cow_merge_state", "Merge state of the copy-on-write session (1 for the current state).", "state")
)

// Describe sends the descriptions.
func (b *bridgeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{nInfo, nRequests, nErrors, nBackendErrs, nReadBytes, nWriteBytes, nLatency,
		nInFlight, nConns, nSwitches, nConnFails, nRTT, nUp, nFetched, nPending, nDirty, nQueue, nActive, nUploads, nUpBytes, nMerge} {
		ch <- d
	}
}

// Collect sends the current values.
func (b *bridgeCollector) Collect(ch chan<- prometheus.Metric) {
	m := func(d *prometheus.Desc, t prometheus.ValueType, v float64, l ...string) {
		ch <- promhist.Const(d, t, v, append([]string{b.device}, l...)...)
	}
	m(nInfo, prometheus.GaugeValue, 1, b.img.Name(), strconv.Itoa(int(b.img.RID())))
	if e := b.engine(); e != nil {
		st := e.Stats()
		for i, v := range [...]uint64{st.Reads, st.Writes, st.Flushes, st.Trims, st.WriteZeroes} {
			m(nRequests, prometheus.CounterValue, float64(v), nbdbridge.LatencyCommands[i])
		}
		m(nErrors, prometheus.CounterValue, float64(st.Errors))
		m(nBackendErrs, prometheus.CounterValue, float64(st.BackendErrors))
		m(nReadBytes, prometheus.CounterValue, float64(st.BytesRead))
		m(nWriteBytes, prometheus.CounterValue, float64(st.BytesWritten))
		m(nInFlight, prometheus.GaugeValue, float64(st.InFlight))
		m(nConns, prometheus.GaugeValue, float64(st.Connections))
		lat := e.Latency()
		for i, cmd := range nbdbridge.LatencyCommands {
			ch <- lat[i].Metric(nLatency, b.device, cmd)
		}
	}
	cs := b.img.Stats()
	m(nSwitches, prometheus.CounterValue, float64(cs.Switches), "rtt")
	m(nSwitches, prometheus.CounterValue, float64(cs.Failovers), "failover")
	m(nConnFails, prometheus.CounterValue, float64(cs.Failures))
	m(nRTT, prometheus.GaugeValue, cs.CurrentRTT.Seconds())
	up := 1.0
	if cs.Panic {
		up = 0
	}
	m(nUp, prometheus.GaugeValue, up)
	m(nFetched, prometheus.CounterValue, float64(cs.BytesRead))
	m(nPending, prometheus.GaugeValue, float64(cs.Pending))
	if b.cow != nil {
		b.collectCOW(m)
	}
}

// collectCOW sends the copy-on-write session's metrics.
func (b *bridgeCollector) collectCOW(m func(*prometheus.Desc, prometheus.ValueType, float64, ...string)) {
	st := b.cow.status()
	m(nDirty, prometheus.GaugeValue, float64(st.DirtyClusters))
	up := st.Upload
	m(nQueue, prometheus.GaugeValue, float64(up.Due))
	m(nActive, prometheus.GaugeValue, float64(up.ActiveUploads))
	m(nUploads, prometheus.CounterValue, float64(up.ClustersUploaded), "stored")
	m(nUploads, prometheus.CounterValue, float64(up.FailedUploads), "failed")
	m(nUploads, prometheus.CounterValue, float64(up.BackPressureReplies), "busy")
	m(nUpBytes, prometheus.CounterValue, float64(up.BytesUploaded))
	cur := b.cow.merge.Load()
	if cur == "" {
		cur = mergeNone
	}
	for _, s := range mergeStates {
		v := 0.0
		if s == cur {
			v = 1
		}
		m(nMerge, prometheus.GaugeValue, v, s)
	}
}

// listenMetrics opens the --metrics-listen socket (nil for ""), before
// anything is attached, so that a busy port fails the command at once.
func listenMetrics(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	return ln, nil
}

// serveMetrics serves the collector's metrics (and the Go runtime's and
// the process's) at /metrics on ln until the returned stop is called. A
// nil ln serves nothing.
func serveMetrics(ln net.Listener, c *bridgeCollector, log *slog.Logger) (stop func()) {
	if ln == nil {
		return func() {}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics server stopped", "err", err)
		}
	}()
	log.Info("serving metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}
}
