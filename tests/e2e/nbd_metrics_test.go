package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/internal/promtest"
)

// TestServeMetricsListen exports a copy-on-write session with
// `dnbd3-nbd serve --metrics-listen`, writes 3,000,000 bytes with qemu-io
// and reads the 16 MiB export back with nbdcopy: the scrape passes
// promtool and shows exactly those bytes, latency samples for one request
// in 16, nothing in flight, and the four changed clusters uploaded to the
// merger.
func TestServeMetricsListen(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	needTool(t, "nbdcopy", "libnbd-bin")
	base := t.TempDir()
	randomImage(t, filepath.Join(base, "m.r1"), 16<<20)
	d := startDaemon(t, base)
	m := mergertest.Start(t)
	maddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	uri, stop := startServe(t, d.addr, "m", "-c", t.TempDir(), "-C", m.Addr, "--upload-delay", "0", "--metrics-listen", maddr)
	url := "http://" + maddr + "/metrics"
	dev := "serve:unix:" + uri[len("nbd+unix:///?socket="):]

	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000000 3000000", "-c", "flush", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	if out, err := exec.Command("nbdcopy", uri, filepath.Join(t.TempDir(), "back.img")).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	deadline := time.Now().Add(30 * time.Second)
	var s *promtest.Scrape
	for {
		s = promtest.Get(t, url, "")
		stored, _ := s.Value("dnbd3_nbd_cow_uploads_total", "outcome", "stored")
		dirty, _ := s.Value("dnbd3_nbd_cow_dirty_clusters")
		inFlight, _ := s.Value("dnbd3_nbd_requests_in_flight")
		if stored >= 4 && dirty == 0 && inFlight == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("uploads never finished: stored %v dirty %v in flight %v", stored, dirty, inFlight)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.Promtool(t)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"dnbd3_nbd_written_bytes_total", []string{"device", dev}, 3000000},
		{"dnbd3_nbd_read_bytes_total", nil, 16 << 20},
		{"dnbd3_nbd_cow_uploads_total", []string{"outcome", "stored"}, 4},
		{"dnbd3_nbd_cow_uploads_total", []string{"outcome", "failed"}, 0},
		{"dnbd3_nbd_cow_merge_state", []string{"state", "none"}, 1},
		{"dnbd3_nbd_server_connected", nil, 1},
		{"dnbd3_nbd_info", []string{"image", "m", "rid", "1"}, 1},
	}
	for _, c := range checks {
		if v := s.Must(t, c.name, c.labels...); v != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
		}
	}
	reads := s.Must(t, "dnbd3_nbd_requests_total", "command", "read")
	// one request in 16 of each connection is timed, whatever its command
	if lat := s.Must(t, "dnbd3_nbd_request_duration_seconds", "command", "read"); reads < 1 || lat < 1 || lat > reads {
		t.Errorf("reads %v, read latency samples %v (one request in 16 per connection)", reads, lat)
	}
	if v := s.Must(t, "dnbd3_nbd_server_read_bytes_total"); v < 13<<20 {
		t.Errorf("bytes read from the server %v: the unchanged 13+ MiB come from there", v)
	}
	if v := s.Must(t, "dnbd3_nbd_cow_uploaded_bytes_total"); v <= 3000000 {
		t.Errorf("uploaded bytes %v, want more than the 3,000,000 written (whole 4 KiB blocks plus bitfields)", v)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
