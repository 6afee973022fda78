package server

import (
	"strconv"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/internal/promhist"
	"github.com/prometheus/client_golang/prometheus"
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("dnbd3_server_"+name, help, labels, nil)
}

var imgLabels = []string{"image", "rid"}

// Descriptions of the server's own metrics.
var (
	mdInfo          = desc("info", "Version of the running server (always 1).", "version")
	mdStart         = desc("start_time_seconds", "Unix time the server started.")
	mdSent          = desc("sent_bytes_total", "Image data bytes sent to clients (relayed data included).")
	mdRecv          = desc("received_bytes_total", "Image data bytes received from uplinks.")
	mdImgSent       = desc("image_sent_bytes_total", "Image data bytes sent to clients, per loaded image.", imgLabels...)
	mdImgRecv       = desc("image_received_bytes_total", "Image data bytes received from uplinks, per loaded image.", imgLabels...)
	mdConnected     = desc("connected_clients", "Connections that selected an image, by peer type (client, server = proxy, iscsi).", "type")
	mdHandshakes    = desc("handshakes_total", "DNBD3 handshakes by outcome.", "outcome")
	mdRequests      = desc("requests_total", "Requests by command (nbd_* in NBD transmission mode).", "command")
	mdReadLatency   = desc("read_duration_seconds", "Time to answer a read: from the local file (disk, one read in 16 per connection is timed) or waiting for an uplink (relay, every read).", "source")
	mdImages        = desc("images", "Loaded images.")
	mdImgSize       = desc("image_size_bytes", "Virtual size of a loaded image.", imgLabels...)
	mdImgUsers      = desc("image_users", "Clients connected to a loaded image.", imgLabels...)
	mdImgComplete   = desc("image_complete_ratio", "Share of the image present locally (1 for complete images).", imgLabels...)
	mdImgCached     = desc("image_cached_bytes", "Bytes of the image present locally.", imgLabels...)
	mdImgProblems   = desc("image_problems", "Problem bits of the image as the RPC reports them (0: none).", imgLabels...)
	mdUplinkUp      = desc("uplink_connected", "1 if the image's uplink has a live connection, 0 if it has an uplink without one.", imgLabels...)
	mdUplinkRTT     = desc("uplink_rtt_seconds", "Round-trip time to the image's current uplink server.", imgLabels...)
	mdUplinkSwitch  = desc("uplink_switches_total", "Uplink server changes of the image's current uplink: rtt (a faster server) or failover.", "image", "rid", "reason")
	mdUplinkPending = desc("uplink_fetches_in_flight", "Uplink fetches in flight for the image.", imgLabels...)
	mdFetched       = desc("uplink_fetched_bytes_total", "Bytes fetched from uplinks by purpose.", "kind")
	mdChecks        = desc("integrity_checks_total", "Hash blocks (16 MiB) whose CRC-32 was checked.")
	mdCheckFails    = desc("integrity_failures_total", "Hash blocks that failed their CRC-32 check.")
	mdEvictions     = desc("lru_evictions_total", "Images removed to make room: disk_space (replicated image deleted) or max_images (unloaded).", "reason")
	mdAltRTT        = desc("altserver_rtt_seconds", "Average of the recent RTT probes of an alt server (0: never reached).", "server")
	mdAltFails      = desc("altserver_failures", "Consecutive failed probes of an alt server.", "server")
	mdSpaceFree     = desc("storage_free_bytes", "Free bytes on the base path's file system.")
	mdSpaceTotal    = desc("storage_size_bytes", "Size of the base path's file system.")
)

// collector is the prometheus.Collector of a Server: it reads the
// server's state when scraped.
type collector struct{ s *Server }

// Describe sends the descriptions of every metric the collector makes.
func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{mdInfo, mdStart, mdSent, mdRecv, mdImgSent, mdImgRecv, mdConnected,
		mdHandshakes, mdRequests, mdReadLatency, mdImages, mdImgSize, mdImgUsers, mdImgComplete, mdImgCached,
		mdImgProblems, mdUplinkUp, mdUplinkRTT, mdUplinkSwitch, mdUplinkPending, mdFetched, mdChecks, mdCheckFails,
		mdEvictions, mdAltRTT, mdAltFails, mdSpaceFree, mdSpaceTotal} {
		ch <- d
	}
}

// connSnapshot is what the collector reads under connMu.
type connSnapshot struct {
	reqs            [reqSlots]uint64
	disk, relay     promhist.Snapshot
	sent            map[*image]uint64
	clients, server int
}

// snapshotConns sums the folded and the live connection counters.
func (s *Server) snapshotConns(loaded map[*image]bool) connSnapshot {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	m := &s.met
	snap := connSnapshot{reqs: m.reqs, disk: m.disk, relay: m.relay, sent: map[*image]uint64{}}
	for img, n := range m.sentByImage {
		if !loaded[img] {
			delete(m.sentByImage, img) // bounded: only loaded images
			continue
		}
		snap.sent[img] = n
	}
	for cc := range s.clients {
		for i := range cc.stats.reqs {
			snap.reqs[i] += cc.stats.reqs[i].Load()
		}
		snap.disk.Add(&cc.stats.disk)
		snap.relay.Add(&cc.stats.relay)
		snap.sent[cc.img] += cc.bytesSent.Load()
		if cc.isServer.Load() {
			snap.server++
		} else {
			snap.clients++
		}
	}
	return snap
}

// Collect sends the current values.
func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- promhist.Const(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- promhist.Const(d, prometheus.CounterValue, v, l...)
	}
	gauge(mdInfo, 1, s.opts.Version)
	gauge(mdStart, float64(s.started.UnixNano())/1e9)
	counter(mdSent, float64(s.bytesSent.Load()))
	counter(mdRecv, float64(s.bytesRecv.Load()))
	images := s.store.list()
	loaded := make(map[*image]bool, len(images))
	for _, img := range images {
		loaded[img] = true
	}
	snap := s.snapshotConns(loaded)
	iscsiSent := map[*image]uint64{}
	iscsiN := 0
	for _, si := range s.iscsi.Sessions() {
		if d, ok := si.Disk.(*iscsiDisk); ok {
			iscsiN++
			iscsiSent[d.img] += si.BytesSent
		}
	}
	gauge(mdConnected, float64(snap.clients), "client")
	gauge(mdConnected, float64(snap.server), "server")
	gauge(mdConnected, float64(iscsiN), "iscsi")
	for i, name := range handshakeOutcomes {
		counter(mdHandshakes, float64(s.met.handshakes[i].Load()), name)
	}
	for i, name := range requestCommands {
		counter(mdRequests, float64(snap.reqs[i]), name)
	}
	ch <- snap.disk.Metric(mdReadLatency, "disk")
	ch <- snap.relay.Metric(mdReadLatency, "relay")
	gauge(mdImages, float64(len(images)))
	for _, img := range images {
		c.collectImage(ch, img, snap.sent[img]+iscsiSent[img])
	}
	for i, name := range fetchKindNames {
		counter(mdFetched, float64(s.met.fetched[i].Load()), name)
	}
	counter(mdChecks, float64(s.met.checks.Load()))
	counter(mdCheckFails, float64(s.met.checkFails.Load()))
	counter(mdEvictions, float64(s.met.lruDeletes.Load()), "disk_space")
	counter(mdEvictions, float64(s.store.evictions.Load()), "max_images")
	for _, a := range s.alts {
		host := formatHost(a.Addr)
		gauge(mdAltRTT, a.avgRTT().Seconds(), host)
		gauge(mdAltFails, float64(a.snapshot().Fails), host)
	}
	if free, total, err := fsutil.DiskSpace(s.config().BasePath); err == nil {
		gauge(mdSpaceFree, float64(free))
		gauge(mdSpaceTotal, float64(total))
	}
}

// collectImage sends the per-image metrics of img.
func (c collector) collectImage(ch chan<- prometheus.Metric, img *image, sent uint64) {
	l := []string{img.Name, strconv.Itoa(int(img.RID))}
	m := func(d *prometheus.Desc, t prometheus.ValueType, v float64, extra ...string) {
		ch <- promhist.Const(d, t, v, append(l, extra...)...)
	}
	m(mdImgSent, prometheus.CounterValue, float64(sent))
	m(mdImgRecv, prometheus.CounterValue, float64(img.bytesRecv.Load()))
	m(mdImgSize, prometheus.GaugeValue, float64(img.VirtualSize))
	m(mdImgUsers, prometheus.GaugeValue, float64(img.Users()))
	m(mdImgProblems, prometheus.GaugeValue, float64(img.Problems()))
	ratio, cached := presence(img)
	m(mdImgComplete, prometheus.GaugeValue, ratio)
	m(mdImgCached, prometheus.GaugeValue, float64(cached))
	up := img.up.Load()
	if up == nil {
		return
	}
	m(mdUplinkPending, prometheus.GaugeValue, float64(fetchesInFlight(up)))
	if !up.connected() {
		m(mdUplinkUp, prometheus.GaugeValue, 0)
		return
	}
	st := up.ci.Stats()
	m(mdUplinkUp, prometheus.GaugeValue, 1)
	m(mdUplinkRTT, prometheus.GaugeValue, st.CurrentRTT.Seconds())
	m(mdUplinkSwitch, prometheus.CounterValue, float64(st.Switches), "rtt")
	m(mdUplinkSwitch, prometheus.CounterValue, float64(st.Failovers), "failover")
}
