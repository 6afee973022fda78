package netns

import (
	"testing"
	"time"
)

// TestDirectReadOverShapedLink checks the harness itself without a proxy:
// a client in room B reads an image straight from the origin in central,
// over the shaped link. The data must be right and the rate must be the
// link's (not faster: the shaping works; not far slower: the link is
// usable for the proxy scenarios' timing assertions).
func TestDirectReadOverShapedLink(t *testing.T) {
	tp := newTopology(t, false)
	const size = 24 * mib
	origin := newServer(t, "origin", tp.central, centralIP, serverConf{})
	sum := makeImage(t, origin.base, "direct", size)
	origin.start()

	r := mustGet(t, "direct read from room B", tp.roomB, origin.addr(), "direct", sum, 60*time.Second, "-S")
	rate := r.rate(size)
	t.Logf("24 MiB over the %d Mbit/s link in %v = %s (link: %s)", linkMbit, r.took.Round(time.Millisecond), mbps(rate), mbps(linkBytesPerSec))
	if rate > 1.5*linkBytesPerSec {
		t.Errorf("read at %s, more than 1.5x the link rate %s: the link is not shaped", mbps(rate), mbps(linkBytesPerSec))
	}
	if rate < 0.3*linkBytesPerSec {
		t.Errorf("read at %s, less than 0.3x the link rate %s: the shaped link is unusable for the timing assertions", mbps(rate), mbps(linkBytesPerSec))
	}
	st := origin.query()
	if st.BytesSent < size {
		t.Errorf("origin RPC bytesSent = %d, want >= %d (the image was read from it)", st.BytesSent, int64(size))
	}

	// Room B itself is fast: a client next to the origin reads at local speed.
	local := mustGet(t, "local read in central", tp.central, "127.0.0.1", "direct", sum, 60*time.Second, "-S")
	t.Logf("24 MiB locally in central in %v = %s", local.took.Round(time.Millisecond), mbps(local.rate(size)))
	if local.rate(size) < 4*linkBytesPerSec {
		t.Errorf("local read at %s, want >= 4x the link rate (%s)", mbps(local.rate(size)), mbps(4*linkBytesPerSec))
	}
}
