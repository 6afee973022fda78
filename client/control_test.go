package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

func serverStat(st Stats, addr string) (ServerStats, bool) {
	for _, s := range st.Servers {
		if s.Addr == addr {
			return s, true
		}
	}
	return ServerStats{}, false
}

// TestAddRemoveServerWhileReading: a server added at runtime is a
// failover target; removing the current server moves the reads to the
// other one without an error; the last server cannot be removed.
func TestAddRemoveServerWhileReading(t *testing.T) {
	t.Parallel()
	data := genImage(2<<20, 21)
	a, b := startPair(t, data)
	cfg := fastConfig(t, "test", a.Addr())
	cfg.Sticky = true
	img := openT(t, cfg)
	ctx := context.Background()
	added, err := img.AddServer(ctx, b.Addr())
	if err != nil || len(added) != 1 || added[0] != b.Addr() {
		t.Fatalf("AddServer(%s) = %v, %v", b.Addr(), added, err)
	}
	if again, err := img.AddServer(ctx, b.Addr()); err != nil || len(again) != 0 {
		t.Fatalf("adding a known server again = %v, %v; want nothing added, no error", again, err)
	}
	if s, ok := serverStat(img.Stats(), b.Addr()); !ok || !s.Added || s.Learned {
		t.Fatalf("added server in stats: %+v (found %v)", s, ok)
	}
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- readLoop(img, data, 64<<10, stop) }()
	eventually(t, 5*time.Second, "reads on A", func() bool { return a.Blocks() > 10 })
	removed, err := img.RemoveServer(ctx, a.Addr())
	if err != nil || len(removed) != 1 || removed[0] != a.Addr() {
		t.Fatalf("RemoveServer(%s) = %v, %v", a.Addr(), removed, err)
	}
	eventually(t, 5*time.Second, "current server B", func() bool { return img.Stats().Current == b.Addr() })
	eventually(t, 5*time.Second, "reads on B", func() bool { return b.Blocks() > 10 })
	close(stop)
	if err := <-errc; err != nil {
		t.Fatalf("reads across the removal: %v", err)
	}
	st := img.Stats()
	if _, ok := serverStat(st, a.Addr()); ok || len(st.Servers) != 1 {
		t.Fatalf("A still listed: %+v", st.Servers)
	}
	if st.Failures != 0 {
		t.Fatalf("a removal was charged as a server failure: %+v", st)
	}
	if _, err := img.RemoveServer(ctx, b.Addr()); err == nil || !strings.Contains(err.Error(), "only server") {
		t.Fatalf("removing the last server: %v", err)
	}
	if _, err := img.RemoveServer(ctx, a.Addr()); !errors.Is(err, ErrUnknownServer) {
		t.Fatalf("removing an unknown server: %v", err)
	}
}

// TestRemovedServerNotLearnedAgain: GET_SERVERS does not bring back a
// server RemoveServer took out; AddServer does.
func TestRemovedServerNotLearnedAgain(t *testing.T) {
	t.Parallel()
	data := genImage(256<<10, 22)
	a, b := startPair(t, data)
	a.Update(func(bh *dnbd3test.Behavior) { bh.Servers = []netip.AddrPort{b.AddrPort()} })
	img := openT(t, fastConfig(t, "test", a.Addr()))
	eventually(t, 2*time.Second, "B learned", func() bool { _, ok := serverStat(img.Stats(), b.Addr()); return ok })
	ctx := context.Background()
	if _, err := img.RemoveServer(ctx, b.Addr()); err != nil {
		t.Fatal(err)
	}
	// A reconnect sends GET_SERVERS again: wait for its answer.
	n := a.GetServers()
	a.KillConns()
	eventually(t, 5*time.Second, "GET_SERVERS after the reconnect", func() bool { return a.GetServers() > n && img.Stats().Current != "" })
	checkRange(t, data, readAll(t, img, 64<<10), 0) // a read round trip after the GET_SERVERS reply
	if _, ok := serverStat(img.Stats(), b.Addr()); ok {
		t.Fatalf("removed server learned again: %+v", img.Stats().Servers)
	}
	if added, err := img.AddServer(ctx, b.Addr()); err != nil || len(added) != 1 {
		t.Fatalf("AddServer after the removal = %v, %v", added, err)
	}
}

// TestSwitchServerPins: SwitchServer moves the reads to the chosen server
// although probing finds the other one faster, and stays there through
// further probe rounds; after Unpin probing switches back.
func TestSwitchServerPins(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 23)
	slow, fast, cfg := slowFastPair(t, data, false) // the fast one wins Open
	cfg.ProbeAfterSwitch = 40 * time.Millisecond
	img := openT(t, cfg)
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- readLoop(img, data, 64<<10, stop) }()
	got, err := img.SwitchServer(context.Background(), slow.Addr())
	if err != nil || got != slow.Addr() {
		t.Fatalf("SwitchServer(%s) = %q, %v", slow.Addr(), got, err)
	}
	st := img.Stats()
	if st.Current != slow.Addr() || st.Pinned != slow.Addr() {
		t.Fatalf("after the switch: current %s pinned %s", st.Current, st.Pinned)
	}
	// Probe rounds go on (the fast server gets new samples) without
	// switching away from the pinned one.
	rounds := probeRounds(img)
	eventually(t, 10*time.Second, "probe rounds after the switch", func() bool {
		s, _ := serverStat(img.Stats(), fast.Addr())
		return s.RTT > 0 && slow.Blocks() > 10 && probeRounds(img) >= rounds+3
	})
	if st := img.Stats(); st.Current != slow.Addr() {
		t.Fatalf("pinned server left for %s", st.Current)
	}
	if !img.Unpin() {
		t.Fatal("Unpin: nothing was pinned")
	}
	eventually(t, 10*time.Second, "probing switches back to the fast server", func() bool { return img.Stats().Current == fast.Addr() })
	close(stop)
	if err := <-errc; err != nil {
		t.Fatalf("reads across the switches: %v", err)
	}
}

// probeRounds returns the number of probe rounds finished since the last
// reconnect.
func probeRounds(img *Image) int {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.probeRounds
}

// TestSwitchServerUnreachable: a switch to a server that does not answer
// fails, and the Image stays on its server.
func TestSwitchServerUnreachable(t *testing.T) {
	t.Parallel()
	data := genImage(256<<10, 24)
	a := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	dead := startServer(t, dnbd3test.Image{Name: "test", Data: data})
	dead.Kill()
	img := openT(t, fastConfig(t, "test", a.Addr()))
	if _, err := img.SwitchServer(context.Background(), dead.Addr()); err == nil {
		t.Fatal("switch to a dead server succeeded")
	}
	if st := img.Stats(); st.Current != a.Addr() || st.Pinned != "" {
		t.Fatalf("after a failed switch: current %s pinned %q", st.Current, st.Pinned)
	}
	checkRange(t, data, readAll(t, img, 64<<10), 0)
}

// TestServerListBounded: AddServer stops at MaxServers.
func TestServerListBounded(t *testing.T) {
	t.Parallel()
	a := startServer(t, dnbd3test.Image{Name: "test", Data: genImage(64<<10, 25)})
	cfg := fastConfig(t, "test", a.Addr())
	cfg.Sticky = true
	img := openT(t, cfg)
	ctx := context.Background()
	for k := 1; k < MaxServers; k++ {
		if _, err := img.AddServer(ctx, fmt.Sprintf("127.0.0.%d:1", k+1)); err != nil {
			t.Fatalf("server %d: %v", k+1, err)
		}
	}
	if _, err := img.AddServer(ctx, "127.0.0.200:1"); !errors.Is(err, ErrServerListFull) {
		t.Fatalf("server %d: %v, want ErrServerListFull", MaxServers+1, err)
	}
	if _, err := img.SwitchServer(ctx, "127.0.0.201:1"); !errors.Is(err, ErrServerListFull) {
		t.Fatalf("switch to a new server with a full list: %v", err)
	}
	if n := len(img.Stats().Servers); n != MaxServers {
		t.Fatalf("%d servers", n)
	}
}

func TestParseServerSpec(t *testing.T) {
	for _, tc := range []struct {
		spec string
		ok   bool
	}{
		{"10.0.0.1", true}, {"10.0.0.1:5004", true}, {"[::1]:5003", true}, {"::1", true}, {"host.example", true},
		{"", false}, {"a b", false}, {"a\nb", false}, {"10.0.0.1:0", false}, {"10.0.0.1:99999", false},
		{"[::1", false}, {strings.Repeat("a", 256), false}, {":5003", false},
	} {
		_, _, err := ParseServerSpec(tc.spec)
		if (err == nil) != tc.ok {
			t.Errorf("ParseServerSpec(%q) = %v, want ok=%v", tc.spec, err, tc.ok)
		}
	}
}

// TestSwitchServerFailurePoints fails a SwitchServer at each point between
// its start and the reads running on the new server, while reads run: the
// target dies during the handshake, is removed during it, the Image is
// closed during it, and the target dies after the switch. Reads never fail
// (except after Close) and the Image ends on a server it still lists.
func TestSwitchServerFailurePoints(t *testing.T) {
	t.Parallel()
	for _, point := range []string{"dies in handshake", "removed in handshake", "closed in handshake", "dies after switch"} {
		t.Run(point, func(t *testing.T) {
			t.Parallel()
			data := genImage(1<<20, 26)
			a, b := startPair(t, data)
			var img *Image
			var hooked atomic.Bool // the next dial to B runs the fault
			cfg := fastConfig(t, "test", a.Addr())
			cfg.Sticky = true
			cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				if addr != b.Addr() || !hooked.CompareAndSwap(true, false) {
					return d.DialContext(ctx, network, addr)
				}
				switch point {
				case "dies in handshake":
					nc, err := d.DialContext(ctx, network, addr)
					b.Kill()
					return nc, err
				case "removed in handshake":
					if _, err := img.RemoveServer(ctx, b.Addr()); err != nil {
						t.Errorf("RemoveServer during the switch: %v", err)
					}
				case "closed in handshake":
					img.Close()
				}
				return d.DialContext(ctx, network, addr)
			}
			img = openT(t, cfg)
			stop := make(chan struct{})
			errc := make(chan error, 1)
			go func() { errc <- readLoop(img, data, 64<<10, stop) }()
			eventually(t, 5*time.Second, "reads on A", func() bool { return a.Blocks() > 10 })
			hooked.Store(point != "dies after switch")
			got, err := img.SwitchServer(context.Background(), b.Addr())
			switch point {
			case "dies after switch":
				if err != nil || got != b.Addr() {
					t.Fatalf("SwitchServer = %q, %v", got, err)
				}
				eventually(t, 5*time.Second, "reads on B", func() bool { return b.Blocks() > 10 })
				b.Kill()
				eventually(t, 5*time.Second, "back on A, unpinned", func() bool {
					st := img.Stats()
					return st.Current == a.Addr() && st.Pinned == ""
				})
			case "closed in handshake":
				if !errors.Is(err, ErrClosed) {
					t.Fatalf("SwitchServer while closing = %q, %v; want ErrClosed", got, err)
				}
				close(stop)
				if err := <-errc; err != nil && !errors.Is(err, ErrClosed) {
					t.Fatalf("reads across the close: %v", err)
				}
				return
			default:
				if err == nil {
					t.Fatalf("SwitchServer = %q, nil; want an error", got)
				}
				if point == "removed in handshake" && !strings.Contains(err.Error(), "removed while switching") {
					t.Fatalf("SwitchServer to a server removed meanwhile: %v", err)
				}
				if st := img.Stats(); st.Current != a.Addr() || st.Pinned != "" {
					t.Fatalf("after the failed switch: current %s pinned %q", st.Current, st.Pinned)
				}
			}
			before := a.Blocks()
			eventually(t, 5*time.Second, "reads go on on A", func() bool { return a.Blocks() > before+10 })
			close(stop)
			if err := <-errc; err != nil {
				t.Fatalf("reads across the switch: %v", err)
			}
			if _, listed := serverStat(img.Stats(), b.Addr()); listed == (point == "removed in handshake") {
				t.Fatalf("B listed = %v after %q", listed, point)
			}
		})
	}
}
