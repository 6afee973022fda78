package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
	"github.com/dnbd3go/dnbd3go/internal/promtest"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// readBack reads size bytes of ci in 1 MiB requests and compares them
// with want.
func readBack(t *testing.T, ci interface {
	ReadAt([]byte, int64) (int, error)
}, want []byte, size int64) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := ci.ReadAt(buf, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
			t.Fatalf("data differs at %d", off)
		}
	}
}

// TestMetricsAfterReading64MiB reads a 64 MiB image and checks that the
// scrape moved by exactly that: bytes sent (total and per image), GET_BLOCK
// requests, disk read latency samples, the handshake and the connected
// client; after the client left its bytes stay in the per-image counter.
func TestMetricsAfterReading64MiB(t *testing.T) {
	const size = 64 << 20
	base := t.TempDir()
	os.MkdirAll(filepath.Join(base, "lab"), 0o755)
	data := genImage(t, base, "lab/win.r3", size, false)
	ts := runServer(t, base, "", nil, nil)
	url := "http://" + ts.addr + "/metrics"
	before := promtest.Get(t, url, "")
	before.Promtool(t)
	if v := before.Must(t, "dnbd3_server_sent_bytes_total"); v != 0 {
		t.Fatalf("sent before any client: %v", v)
	}
	before.Want(t, size, "dnbd3_server_image_size_bytes", "image", "lab/win", "rid", "3")
	if !before.Has("go_goroutines") || !before.Has("process_open_fds") {
		t.Error("Go runtime or process collector missing")
	}

	ci := openClient(t, ts.addr, "lab/win", 3, 10*time.Second)
	readBack(t, ci, data, size)
	during := promtest.Get(t, url, "")
	during.Promtool(t)
	during.Want(t, size, "dnbd3_server_sent_bytes_total")
	during.Want(t, size, "dnbd3_server_image_sent_bytes_total", "image", "lab/win", "rid", "3")
	reqs := during.Must(t, "dnbd3_server_requests_total", "command", "get_block")
	if reqs < 64 {
		t.Errorf("get_block requests %v, want at least 64 (1 MiB each at most)", reqs)
	}
	// one read in 16 of the connection is timed, after its reply left: the
	// last sample may follow the scrape by a moment
	samples := float64((int(reqs) + promhist.SampleEvery - 1) / promhist.SampleEvery)
	waitFor(t, 10*time.Second, "one disk latency sample per 16 GET_BLOCKs", func() bool {
		v, _ := promtest.Get(t, url, "").Value("dnbd3_server_read_duration_seconds", "source", "disk")
		return v == samples
	})
	during.Want(t, 1, "dnbd3_server_handshakes_total", "outcome", "ok")
	during.Want(t, 1, "dnbd3_server_connected_clients", "type", "client")
	during.Want(t, 1, "dnbd3_server_image_users", "image", "lab/win")
	ci.Close()
	waitFor(t, 10*time.Second, "client gone", func() bool {
		s := promtest.Get(t, url, "")
		v, _ := s.Value("dnbd3_server_connected_clients", "type", "client")
		return v == 0
	})
	after := promtest.Get(t, url, "")
	after.Want(t, size, "dnbd3_server_image_sent_bytes_total", "image", "lab/win", "rid", "3")
	if v := after.Must(t, "dnbd3_server_requests_total", "command", "get_block"); v < reqs {
		t.Errorf("request counter went back from %v to %v", reqs, v)
	}
	if v := after.Must(t, "dnbd3_server_rpc_requests_total", "path", "metrics", "code", "200"); v < 3 {
		t.Errorf("rpc_requests_total for /metrics: %v", v)
	}
}

// TestMetricsHandshakeOutcomes counts a refused image and a malformed
// first message.
func TestMetricsHandshakeOutcomes(t *testing.T) {
	base := t.TempDir()
	genImage(t, base, "a.r1", 8192, false)
	ts := runServer(t, base, "", nil, nil)
	c := dial(t, ts.addr)
	if _, ok := selectFlags(t, c, "missing", 1, 0); ok {
		t.Fatal("missing image selected")
	}
	c2 := dial(t, ts.addr)
	send(t, c2, protocol.Request{Cmd: protocol.CmdGetBlock, Size: 4096}, nil)
	expectClosed(t, c2, 10*time.Second)
	url := "http://" + ts.addr + "/metrics"
	waitFor(t, 10*time.Second, "both handshakes counted", func() bool {
		s := promtest.Get(t, url, "")
		u, _ := s.Value("dnbd3_server_handshakes_total", "outcome", "unavailable")
		m, _ := s.Value("dnbd3_server_handshakes_total", "outcome", "malformed")
		return u == 1 && m == 1
	})
}

// TestMetricsProxyReplication replicates a 32 MiB image with CRCs through
// a proxy: the proxy's received bytes, the fetched bytes by kind, the
// completeness ratio and the integrity checks must add up.
func TestMetricsProxyReplication(t *testing.T) {
	const size = 32 << 20
	up := runServer(t, t.TempDir(), "", nil, nil)
	data := genImage(t, up.base, "big.r1", size, true)
	if _, _, _, err := up.store.reload(); err != nil {
		t.Fatal(err)
	}
	proxy := runServer(t, t.TempDir(), "isProxy=true\nbackgroundReplication=true\nautoFreeDiskSpaceDelay=-1\nuplinkTimeout=3000\n[limits]\nmaxPrefetch=0\n",
		map[string]string{"alt-servers": altServersFor(up.addr)}, nil)
	ci := openClient(t, proxy.addr, "big", 1, 10*time.Second)
	readBack(t, ci, data, 1<<20)
	url := "http://" + proxy.addr + "/metrics"
	waitFor(t, 60*time.Second, "replication complete", func() bool {
		s := promtest.Get(t, url, "")
		v, _ := s.Value("dnbd3_server_image_complete_ratio", "image", "big", "rid", "1")
		return v == 1
	})
	s := promtest.Get(t, url, "")
	s.Promtool(t)
	s.Want(t, size, "dnbd3_server_received_bytes_total")
	s.Want(t, size, "dnbd3_server_image_received_bytes_total", "image", "big", "rid", "1")
	relayed := s.Must(t, "dnbd3_server_uplink_fetched_bytes_total", "kind", "relay")
	repl := s.Must(t, "dnbd3_server_uplink_fetched_bytes_total", "kind", "replication")
	if relayed < 1<<20 || relayed+repl != size {
		t.Errorf("relayed %v + replicated %v, want at least 1 MiB relayed and %d in all", relayed, repl, size)
	}
	s.Want(t, size, "dnbd3_server_image_cached_bytes", "image", "big")
	if v := s.Must(t, "dnbd3_server_read_duration_seconds", "source", "relay"); v < 1 {
		t.Errorf("relay latency samples %v", v)
	}
	s.Want(t, 1, "dnbd3_server_uplink_connected", "image", "big")
	if _, ok := s.Value("dnbd3_server_uplink_rtt_seconds", "image", "big"); !ok {
		t.Error("no uplink RTT")
	}
	hashBlocks := float64(size / protocol.HashBlockSize)
	waitFor(t, 30*time.Second, "every hash block checked", func() bool {
		v, _ := promtest.Get(t, url, "").Value("dnbd3_server_integrity_checks_total")
		return v >= hashBlocks
	})
	promtest.Get(t, url, "").Want(t, 0, "dnbd3_server_integrity_failures_total")
	if v := s.Must(t, "dnbd3_server_altserver_rtt_seconds", "server", up.addr); v < 0 {
		t.Errorf("alt server rtt %v", v)
	}
}

// TestMetricsACL: METRICS and STATS grant /metrics, IMAGE_LIST does not;
// METRICS alone grants nothing else.
func TestMetricsACL(t *testing.T) {
	base := t.TempDir()
	genImage(t, base, "a.r1", 8192, false)
	for acl, want := range map[string]int{
		"127.0.0.0/8 METRICS\n":    200,
		"127.0.0.0/8 STATS\n":      200,
		"127.0.0.0/8 ALL\n":        200,
		"127.0.0.0/8 IMAGE_LIST\n": 403,
		"10.0.0.0/8 ALL\n":         403,
	} {
		ts := runServer(t, base, "", map[string]string{"rpc.acl": acl}, nil)
		code, _ := promtest.Fetch(t, "http://"+ts.addr+"/metrics", "")
		if code != want {
			t.Errorf("%q: /metrics %d, want %d", acl, code, want)
		}
		if acl == "127.0.0.0/8 METRICS\n" {
			if code, _ := promtest.Fetch(t, "http://"+ts.addr+"/query?q=stats", ""); code != 403 {
				t.Errorf("METRICS grants q=stats: %d", code)
			}
		}
	}
}

// TestRPCRequestCounter counts RPC requests by path label and status code:
// a known path, a status page asset and an unknown path (label "other").
func TestRPCRequestCounter(t *testing.T) {
	ts := runServer(t, t.TempDir(), "", nil, nil)
	base := "http://" + ts.addr
	for _, p := range []string{"/nothing-here", "/nothing-either", "/status.css", "/query?q=version"} {
		promtest.Fetch(t, base+p, "")
	}
	s := promtest.Get(t, base+"/metrics", "")
	for _, c := range []struct {
		path, code string
		want       float64
	}{{"other", "404", 2}, {"status_asset", "200", 1}, {"query", "200", 1}} {
		s.Want(t, c.want, "dnbd3_server_rpc_requests_total", "path", c.path, "code", c.code)
	}
}
