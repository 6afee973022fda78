package client

import (
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

func TestSwitchToFasterServer(t *testing.T) {
	t.Parallel()
	data := genImage(1<<20, 14)
	slow, fast, cfg := slowFastPair(t, data, true) // the slow one wins Open
	img := openT(t, cfg)
	if img.Stats().Current != slow.Addr() {
		t.Fatalf("opened on %s", img.Stats().Current)
	}
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- readLoop(img, data, 64<<10, stop) }()
	eventually(t, 5*time.Second, "switch to the fast server", func() bool { return img.Stats().Current == fast.Addr() })
	eventually(t, 5*time.Second, "reads on the fast server", func() bool { return fast.Blocks() > 10 })
	close(stop)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	st := img.Stats()
	if st.Switches < 1 || st.Failovers != 0 {
		t.Fatalf("switches %d failovers %d", st.Switches, st.Failovers)
	}
	var slowRTT, fastRTT time.Duration
	for _, s := range st.Servers {
		if s.Addr == slow.Addr() {
			slowRTT = s.RTT
		} else {
			fastRTT = s.RTT
		}
	}
	// Only the order is asserted: the absolute RTTs of loopback servers
	// swing with the machine's load.
	if slowRTT < 30*time.Millisecond || fastRTT == 0 || fastRTT >= slowRTT {
		t.Fatalf("RTTs: slow %v fast %v", slowRTT, fastRTT)
	}
	if fast.GetServers() < 1 {
		t.Error("no GET_SERVERS after the switch")
	}
}

func TestNoSwitchWithinHysteresis(t *testing.T) {
	t.Parallel()
	data := genImage(64<<10, 15)
	a, b := startPair(t, data)
	cfg := fastConfig(t, "test", a.Addr(), b.Addr())
	cfg.OpenStagger = 300 * time.Millisecond
	cfg.NoProbe = false
	cfg.ProbeStartupInterval = 20 * time.Millisecond
	cfg.SwitchThreshold = time.Second // nothing on loopback is that much faster
	img := openT(t, cfg)
	eventually(t, 5*time.Second, "probes", func() bool {
		st := img.Stats()
		return st.Servers[0].Samples == 4 && st.Servers[1].Samples == 4
	})
	if st := img.Stats(); st.Switches != 0 || st.Current != a.Addr() {
		t.Fatalf("switched between equal servers: %+v", st)
	}
}

// slowFastPair starts two servers of data, slow answering blocks 30 ms
// late, and returns a Config with RTT probing every 40 ms that opens on
// the slow one if slowFirst, else on the fast one.
func slowFastPair(t *testing.T, data []byte, slowFirst bool) (slow, fast *dnbd3test.Server, cfg Config) {
	slow, fast = startPair(t, data)
	slow.Update(func(b *dnbd3test.Behavior) { b.BlockDelay = 30 * time.Millisecond })
	first, second := slow, fast
	if !slowFirst {
		first, second = fast, slow
	}
	cfg = fastConfig(t, "test", first.Addr(), second.Addr())
	cfg.OpenStagger = 300 * time.Millisecond // the first one wins Open
	cfg.NoProbe = false
	cfg.ProbeStartupInterval = 40 * time.Millisecond
	cfg.StallTimeout = 2 * time.Second
	return slow, fast, cfg
}
