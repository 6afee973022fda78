package netns

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// imageSize is the size of the images that cross the shaped link: about
// 4 s at 100 Mbit/s. A multiple of 16 MiB (three CRC hash blocks), so the
// proxy's copy (stored at the 4 KiB-padded size) equals the origin's file.
const imageSize = 48 * mib

// originWithImage starts the origin in central serving one image of size
// bytes and returns it with the image's sha256.
func originWithImage(t *testing.T, tp *topology, image string, size int64) (*server, string) {
	t.Helper()
	origin := newServer(t, "origin", tp.central, centralIP, serverConf{})
	sum := makeImage(t, origin.base, image, size)
	origin.start()
	return origin, sum
}

// proxyConf is a proxy's configuration with uplink as its only uplink.
func proxyConf(uplink, bgr string, window int) serverConf {
	return serverConf{Proxy: true, BGR: bgr, BGRWindow: window, Uplinks: []string{uplink}}
}

// startProxyB starts proxy B in room B with uplink as its uplink.
func startProxyB(t *testing.T, tp *topology, uplink, bgr string, window int) *server {
	t.Helper()
	proxy := newServer(t, "proxy B", tp.roomB, roomBUpIP, proxyConf(uplink, bgr, window))
	proxy.start()
	return proxy
}

// imageState returns the proxy's RPC entry for image (nil if not listed)
// and a description for messages.
func imageState(s *server, image string) (*rpcImage, *rpcStats, string) {
	st, err := s.tryQuery()
	if err != nil {
		return nil, nil, "RPC error: " + err.Error()
	}
	img := st.image(image)
	if img == nil {
		return nil, st, fmt.Sprintf("%s does not list image %q (bytesReceived %d)", s.name, image, st.BytesReceived)
	}
	return img, st, fmt.Sprintf("%s: %s complete %d%%, users %d, problems %d, image bytesReceived %d, uplink %q; server bytesReceived %d",
		s.name, image, img.Complete, img.Users, img.Problems, img.BytesReceived, img.UplinkServer, st.BytesReceived)
}

// waitComplete waits until s reports image complete (RPC complete = 100).
func waitComplete(t *testing.T, s *server, image string, within time.Duration, what string) {
	t.Helper()
	waitFor(t, within, what, func() (bool, string) {
		img, _, state := imageState(s, image)
		return img != nil && img.Complete == 100, state
	})
}

// waitReplicated waits until the proxy reports image complete, its .map
// file is gone and its copy's sha256 is want.
func waitReplicated(t *testing.T, proxy *server, image, want string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	waitComplete(t, proxy, image, within, proxy.name+" to complete "+image+" (RPC complete = 100)")
	took := time.Since(start)
	mapFile := proxy.imagePath(image, 1) + ".map"
	waitFor(t, 30*time.Second, "the proxy to delete "+mapFile+" after completing the image", func() (bool, string) {
		return !fileExists(mapFile), mapFile + " still exists"
	})
	got, err := testutil.SHA256Of(proxy.imagePath(image, 1))
	if err != nil {
		t.Fatalf("%s's copy of %s: %v", proxy.name, image, err)
	}
	if got != want {
		t.Fatalf("%s reports %s complete, but its copy's sha256 is %s, the origin's %s", proxy.name, image, got, want)
	}
	return took
}

// TestProxyFirstReadOverLinkSecondLocal: the first read of an image in room
// B goes through the proxy at about link speed and the proxy receives the
// whole image from the origin; the cache fills while it runs. A second
// client then reads the same image from the proxy's cache at local speed,
// without the proxy fetching anything again.
func TestProxyFirstReadOverLinkSecondLocal(t *testing.T) {
	tp := newTopology(t, false)
	origin, sum := originWithImage(t, tp, "room", imageSize)
	proxy := startProxyB(t, tp, origin.addr(), "false", 0)

	// First client; sample the proxy's RPC and cache map while it reads.
	c1 := startGet(t, tp.roomB, proxy.addr(), "room", 120*time.Second, "-S")
	type sample struct {
		complete int
		blocks   int64
		uplink   string
	}
	var samples []sample
	var r1 getResult
	for done := false; !done; {
		select {
		case r1 = <-c1.done:
			done = true
		case <-time.After(150 * time.Millisecond):
			if img, _, _ := imageState(proxy, "room"); img != nil {
				blocks, err := proxy.cacheMap(img.ID, img.Size)
				if err != nil {
					t.Errorf("GET /cachemap?id=%d: %v", img.ID, err)
				}
				samples = append(samples, sample{img.Complete, blocks, img.UplinkServer})
			}
		}
	}
	checkGet(t, "first read through the proxy", r1, sum)
	rate1 := r1.rate(imageSize)
	t.Logf("first read: 48 MiB in %v = %s (link %s)", r1.took.Round(time.Millisecond), mbps(rate1), mbps(linkBytesPerSec))
	if rate1 > 1.5*linkBytesPerSec {
		t.Errorf("first read at %s, more than 1.5x the link rate %s: it cannot have crossed the link", mbps(rate1), mbps(linkBytesPerSec))
	}
	st := proxy.query()
	if st.BytesReceived < imageSize || st.BytesReceived > imageSize*11/10 {
		t.Errorf("proxy RPC stats.bytesReceived = %d after the first read, want the image size %d (up to +10%%)", st.BytesReceived, int64(imageSize))
	}

	// The cache filled while the client read.
	var partial []string
	sawUplink := false
	prev := sample{}
	for i, s := range samples {
		if i > 0 && (s.complete < prev.complete || s.blocks < prev.blocks) {
			t.Errorf("cache state went backwards: sample %d complete %d%% blocks %d after complete %d%% blocks %d", i, s.complete, s.blocks, prev.complete, prev.blocks)
		}
		if s.complete > 0 && s.complete < 100 && s.blocks > 0 && s.blocks < imageSize/4096 &&
			(len(partial) == 0 || s.blocks != prev.blocks) {
			partial = append(partial, fmt.Sprintf("%d%%/%d blocks", s.complete, s.blocks))
		}
		if s.uplink == origin.addr() {
			sawUplink = true
		}
		prev = s
	}
	t.Logf("%d RPC samples during the first read; partial states: %s", len(samples), strings.Join(partial, ", "))
	if len(partial) < 2 {
		t.Errorf("RPC complete and /cachemap did not show the cache filling during the first read (want >= 2 distinct partial states, got %v; samples %v)", partial, samples)
	}
	if !sawUplink {
		t.Errorf("RPC images[].uplinkServer never showed the origin %s while the proxy fetched (samples %v)", origin.addr(), samples)
	}
	waitComplete(t, proxy, "room", 10*time.Second, "the proxy to report the image complete after a full read")
	if img, _, _ := imageState(proxy, "room"); img != nil {
		if blocks, err := proxy.cacheMap(img.ID, img.Size); err != nil || blocks != imageSize/4096 {
			t.Errorf("/cachemap after a full read: %d of %d blocks (err %v)", blocks, imageSize/4096, err)
		}
	}

	// Second client: from the cache.
	before := proxy.query()
	r2 := mustGet(t, "second read from the proxy's cache", tp.roomB, proxy.addr(), "room", sum, 60*time.Second, "-S")
	rate2 := r2.rate(imageSize)
	after := proxy.query()
	t.Logf("second read: 48 MiB in %v = %s (%.1fx the link rate)", r2.took.Round(time.Millisecond), mbps(rate2), rate2/linkBytesPerSec)
	if rate2 < 4*linkBytesPerSec {
		t.Errorf("second read at %s, want at least 4x the link rate (%s): not served from the proxy's cache", mbps(rate2), mbps(4*linkBytesPerSec))
	}
	if d := after.BytesReceived - before.BytesReceived; d > mib {
		t.Errorf("the proxy received %d bytes from its uplink during the second read, want ~0 (served from cache)", d)
	}
	if d := after.BytesSent - before.BytesSent; d < imageSize {
		t.Errorf("the proxy's stats.bytesSent grew by %d during the second read, want >= %d (data served from its own copy)", d, int64(imageSize))
	}
}

// TestProxyBackgroundReplication: with backgroundReplication=true and a
// client that reads only the first MiB, the proxy fetches the rest of the
// image on its own: RPC complete reaches 100, the .map file goes away, and
// the copy is identical to the origin's.
func TestProxyBackgroundReplication(t *testing.T) {
	tp := newTopology(t, false)
	origin, sum := originWithImage(t, tp, "bgr", imageSize)
	proxy := startProxyB(t, tp, origin.addr(), "true", 8)

	head := mustGet(t, "read of the first MiB", tp.roomB, proxy.addr(), "bgr", "", 60*time.Second, "-S", "--length", "1M")
	if fi, err := os.Stat(head.file); err != nil || fi.Size() != mib {
		t.Fatalf("the first-MiB read wrote %v bytes (err %v), want %d", fi, err, mib)
	}
	took := waitReplicated(t, proxy, "bgr", sum, 120*time.Second)
	t.Logf("background replication of 48 MiB finished %v after the client's read (the link alone needs %.1f s)",
		took.Round(time.Millisecond), float64(imageSize)/linkBytesPerSec)
	if fi, err := os.Stat(proxy.imagePath("bgr", 1)); err != nil || fi.Size() != imageSize {
		t.Errorf("proxy's copy: %v (err %v), want %d bytes", fi, err, int64(imageSize))
	}
	st := proxy.query()
	if st.BytesReceived < imageSize || st.BytesReceived > imageSize*11/10 {
		t.Errorf("proxy stats.bytesReceived = %d, want about the image size %d (each block fetched once)", st.BytesReceived, int64(imageSize))
	}
	// And it is served: a client reads it at local speed.
	r := mustGet(t, "read of the replicated image", tp.roomB, proxy.addr(), "bgr", sum, 60*time.Second, "-S")
	if r.rate(imageSize) < 4*linkBytesPerSec {
		t.Errorf("read of the replicated image at %s, want at least 4x the link rate", mbps(r.rate(imageSize)))
	}
}

// TestProxyKilledMidRead: a client that lists the proxy first and the
// origin second keeps reading when the proxy is killed halfway and ends
// with the right data.
func TestProxyKilledMidRead(t *testing.T) {
	tp := newTopology(t, false)
	origin, sum := originWithImage(t, tp, "failover", imageSize)
	proxy := startProxyB(t, tp, origin.addr(), "false", 0)

	c := startGet(t, tp.roomB, proxy.addr()+" "+origin.addr(), "failover", 120*time.Second, "-S")
	waitFor(t, 30*time.Second, "the client to read 8 MiB through the proxy (proxy stats.bytesReceived >= 8 MiB)", func() (bool, string) {
		select {
		case r := <-c.done:
			c.done <- r
			t.Fatalf("the client finished before the proxy had fetched 8 MiB for it (it did not read through the proxy): %v\n%s", r.err, trimOutput(r.output))
		default:
		}
		st, err := proxy.tryQuery()
		if err != nil {
			return false, err.Error()
		}
		return st.BytesReceived >= 8*mib, fmt.Sprintf("proxy bytesReceived %d, images %+v", st.BytesReceived, st.Images)
	})
	st := proxy.query()
	proxy.kill()
	t.Logf("proxy killed (SIGKILL) after fetching %d bytes for the client", st.BytesReceived)
	r := c.wait()
	checkGet(t, "read with the proxy killed halfway", r, sum)
	t.Logf("client finished %v after start", r.took.Round(time.Millisecond))
	ost := origin.query()
	if ost.BytesSent < imageSize {
		t.Errorf("origin sent %d bytes in total, want >= %d", ost.BytesSent, int64(imageSize))
	}
}

// TestOriginKilledAfterReplication: once the proxy holds a complete copy,
// the origin can die: clients that list the proxy (first or second) read
// the whole image from it.
func TestOriginKilledAfterReplication(t *testing.T) {
	tp := newTopology(t, false)
	origin, sum := originWithImage(t, tp, "survivor", imageSize)
	proxy := startProxyB(t, tp, origin.addr(), "true", 8)
	mustGet(t, "read of the first MiB", tp.roomB, proxy.addr(), "survivor", "", 60*time.Second, "-S", "--length", "1M")
	waitReplicated(t, proxy, "survivor", sum, 120*time.Second)

	// One client reading while the origin dies, one started afterwards
	// with the dead origin first in its list.
	before := proxy.query()
	c := startGet(t, tp.roomB, proxy.addr()+" "+origin.addr(), "survivor", 60*time.Second, "-S")
	origin.kill()
	if err := waitListening(tp.roomB, origin.addr(), 200*time.Millisecond); err == nil {
		t.Fatal("the origin still accepts connections after SIGKILL")
	}
	checkGet(t, "read from the proxy (listed first) with the origin dead", c.wait(), sum)
	checkGet(t, "read with the dead origin listed first", runGet(t, tp.roomB, origin.addr()+" "+proxy.addr(), "survivor", 60*time.Second, "-S"), sum)
	after := proxy.query()
	if d := after.BytesSent - before.BytesSent; d < 2*imageSize {
		t.Errorf("the proxy served %d bytes to the two clients, want >= %d (both read the whole image from it)", d, int64(2*imageSize))
	}
	if img := after.image("survivor"); img == nil || img.Complete != 100 {
		t.Errorf("proxy's image entry after the origin died: %+v, want complete 100", img)
	}
}

// TestProxyChain: room C's proxy uses room B's proxy as uplink, which uses
// the origin. A client in room C gets the right data, and the origin sees
// requests that passed two proxies (hop count 2) from a peer that
// announced itself as a server.
func TestProxyChain(t *testing.T) {
	tp := newTopology(t, true)
	const size = 32 * mib
	origin, sum := originWithImage(t, tp, "chain", size)
	rel := startRelay(t, tp.central, centralIP+":5004", "127.0.0.1:5003")
	proxyB := startProxyB(t, tp, rel.addr(), "false", 0)
	proxyC := newServer(t, "proxy C", tp.roomC, roomCIP, proxyConf(roomBDownIP+":5003", "false", 0))
	proxyC.start()

	r := mustGet(t, "read in room C through two proxies", tp.roomC, proxyC.addr(), "chain", sum, 120*time.Second, "-S")
	t.Logf("room C read 32 MiB through two proxies in %v = %s", r.took.Round(time.Millisecond), mbps(r.rate(size)))
	summary := rel.summary()
	t.Logf("the origin's relay saw: %s", summary)

	rel.mu.Lock()
	var serverSelect bool
	for _, s := range rel.selects {
		if s.Name == "chain" && s.Flags&protocol.FlagServer != 0 {
			serverSelect = true
		}
	}
	var hop2, bytes int64
	var tooMany []string
	for h, n := range rel.hops {
		bytes += rel.hopBytes[h]
		switch c := protocol.HopCount(h); {
		case c == 2:
			hop2 += int64(n)
		case c > 2:
			tooMany = append(tooMany, fmt.Sprintf("%d requests with hops=%#02x", n, h))
		}
	}
	rel.mu.Unlock()
	if !serverSelect {
		t.Errorf("the origin saw no SELECT_IMAGE for \"chain\" with the server flag: %s", summary)
	}
	if hop2 == 0 {
		t.Errorf("the origin saw no GET_BLOCK with hop count 2 (client -> proxy C -> proxy B -> origin): %s", summary)
	}
	if len(tooMany) > 0 {
		t.Errorf("the origin saw requests with hop count > 2: %s", strings.Join(tooMany, ", "))
	}
	if bytes < size {
		t.Errorf("the origin was asked for %d bytes, want >= %d (everything room C read came from it)", bytes, int64(size))
	}
	if st := origin.query(); st.BytesSent < size {
		t.Errorf("origin stats.bytesSent = %d, want >= %d", st.BytesSent, int64(size))
	}
	// Both proxies cached the image on the way.
	for _, p := range []*server{proxyB, proxyC} {
		waitComplete(t, p, "chain", 10*time.Second, p.name+" to hold the complete image")
	}
}

// TestAltServerCycle: proxy B's uplink is proxy C and proxy C's is proxy
// B; neither has the image a client asks for. The request must end in
// bounded time with an error, nothing may keep bouncing between the two,
// and both keep serving.
func TestAltServerCycle(t *testing.T) {
	tp := newTopology(t, true)
	// Each proxy reaches the other through a recording relay, to see the
	// lookups go around.
	toC := startRelay(t, tp.roomC, roomCIP+":5004", "127.0.0.1:5003")
	toB := startRelay(t, tp.roomB, roomBDownIP+":5004", "127.0.0.1:5003")
	proxyB := newServer(t, "proxy B", tp.roomB, roomBUpIP, proxyConf(toC.addr(), "false", 0))
	localSum := makeImage(t, proxyB.base, "local", 4*mib)
	proxyB.start()
	proxyC := newServer(t, "proxy C", tp.roomC, roomCIP, proxyConf(toB.addr(), "false", 0))
	proxyC.start()

	selects := func(r *relay) int {
		r.mu.Lock()
		defer r.mu.Unlock()
		n := 0
		for _, s := range r.selects {
			if s.Name == "nowhere" {
				n++
			}
		}
		return n
	}
	const limit = 90 * time.Second
	r := runGet(t, tp.roomB, proxyB.addr(), "nowhere", limit, "-S", "--timeout", "10s")
	t.Logf("client asking for an image nobody has ended after %v: %v: %s", r.took.Round(time.Millisecond), r.err, trimOutput(r.output))
	t.Logf("proxy B -> proxy C: %s", toC.summary())
	t.Logf("proxy C -> proxy B: %s", toB.summary())
	if r.killed {
		t.Fatalf("the client asking for an image nobody has still ran after %v (killed): the request hangs or loops", limit)
	}
	if r.err == nil {
		t.Errorf("the client reported success for an image neither proxy has")
	}
	if selects(toC) == 0 {
		t.Errorf("proxy B never asked its uplink (proxy C) for the unknown image: the cycle was not exercised")
	}
	// The lookups stop: no new SELECT_IMAGE goes around once the client
	// has gone.
	n0 := selects(toB) + selects(toC)
	for _, p := range []*server{proxyB, proxyC} {
		waitFor(t, 20*time.Second, p.name+" to have no connections left (nothing bouncing between the proxies)", func() (bool, string) {
			st, err := p.tryQuery()
			if err != nil {
				return false, err.Error()
			}
			return st.ClientCount+st.ServerCount == 0 && len(st.Clients) == 0,
				fmt.Sprintf("clientCount %d, serverCount %d, clients %+v", st.ClientCount, st.ServerCount, st.Clients)
		})
		st := p.query()
		if img := st.image("nowhere"); img != nil {
			t.Errorf("%s lists image \"nowhere\" that no server has: %+v", p.name, *img)
		}
	}
	time.Sleep(2 * time.Second)
	if n1 := selects(toB) + selects(toC); n1 != n0 || n1 > 20 {
		t.Errorf("the proxies asked each other for the unknown image %d times (%d after the client had gone): the lookup loops", n1, n1-n0)
	}
	// Still healthy: proxy B serves its own image.
	mustGet(t, "read of proxy B's local image after the cycle", tp.roomB, proxyB.addr(), "local", localSum, 30*time.Second, "-S")
}

// TestProxyRestartFetchesOnlyMissing: a proxy stopped (SIGTERM) after half
// an image was fetched saves its cache map; after the restart a full read
// fetches only the part that was missing.
func TestProxyRestartFetchesOnlyMissing(t *testing.T) {
	tp := newTopology(t, false)
	origin, sum := originWithImage(t, tp, "resume", imageSize)
	proxy := startProxyB(t, tp, origin.addr(), "false", 0)

	mustGet(t, "read of the first 24 MiB", tp.roomB, proxy.addr(), "resume", "", 60*time.Second, "-S", "--length", "24M")
	st0 := proxy.query()
	proxy.stop()
	mapFile := proxy.imagePath("resume", 1) + ".map"
	m, err := os.ReadFile(mapFile)
	if err != nil {
		t.Fatalf("after SIGTERM of a proxy with a half-cached image: %v (the cache map must be saved at shutdown)", err)
	}
	cached := countBits(m, imageSize/4096) * 4096
	t.Logf("proxy fetched %d bytes before SIGTERM; its saved .map marks %d bytes", st0.BytesReceived, cached)
	if cached < 24*mib || cached >= imageSize {
		t.Fatalf("saved .map marks %d bytes as cached, want >= 24 MiB (what the client read) and < the image size %d", cached, int64(imageSize))
	}
	missing := imageSize - cached

	sent0 := origin.query().BytesSent
	proxy.start()
	mustGet(t, "full read after the restart", tp.roomB, proxy.addr(), "resume", sum, 120*time.Second, "-S")
	delta := origin.query().BytesSent - sent0
	recv := proxy.query().BytesReceived
	t.Logf("after the restart: origin sent %d bytes, proxy received %d; missing were %d", delta, recv, missing)
	const tolerance = 2 * mib
	if delta < uint64(missing) || delta > uint64(missing+tolerance) {
		t.Errorf("origin sent %d bytes for the read after the restart, want the missing %d (+ up to %d)", delta, missing, tolerance)
	}
	if recv < uint64(missing) || recv > uint64(missing+tolerance) {
		t.Errorf("restarted proxy's stats.bytesReceived = %d, want the missing %d (+ up to %d)", recv, missing, tolerance)
	}
	waitReplicated(t, proxy, "resume", sum, 30*time.Second)
}

// TestCorruptBlockRepaired: a byte flipped in a complete 16 MiB hash block
// of the proxy's copy is found by the check SIGUSR1 starts ("Hash check
// for block 1 of NAME failed"), and the proxy fetches the block again.
func TestCorruptBlockRepaired(t *testing.T) {
	tp := newTopology(t, false)
	origin := newServer(t, "origin", tp.central, centralIP, serverConf{})
	sum := makeImage(t, origin.base, "crc", imageSize)
	if out, err := exec.Command(filepath.Join(binDir, "dnbd3-server"), "--crc", origin.imagePath("crc", 1)).CombinedOutput(); err != nil {
		t.Fatalf("dnbd3-server --crc: %v\n%s", err, out)
	}
	origin.start()
	proxy := startProxyB(t, tp, origin.addr(), "true", 8)
	mustGet(t, "read of the first MiB", tp.roomB, proxy.addr(), "crc", "", 60*time.Second, "-S", "--length", "1M")
	waitReplicated(t, proxy, "crc", sum, 120*time.Second)
	if !fileExists(proxy.imagePath("crc", 1) + ".crc") {
		t.Logf("note: the proxy keeps no .crc file next to its copy")
	}

	// Flip one byte in hash block 1 (16-32 MiB).
	const off = 20*mib + 12345
	testutil.FlipByte(t, proxy.imagePath("crc", 1), off)
	if got, _ := testutil.SHA256Of(proxy.imagePath("crc", 1)); got == sum {
		t.Fatal("flipping a byte did not change the proxy's copy")
	}
	recv0 := proxy.query().BytesReceived
	logOff := len(proxy.readLog())

	proxy.signal(syscall.SIGUSR1)
	want := "Hash check for block 1 of crc failed"
	waitFor(t, 30*time.Second, "the proxy to log "+want, func() (bool, string) {
		l := proxy.readLog()[logOff:]
		return strings.Contains(l, want), "log since SIGUSR1: " + lastLines(l, 8)
	})
	waitFor(t, 60*time.Second, "the proxy's copy to be repaired (sha256 equal to the origin's)", func() (bool, string) {
		got, err := testutil.SHA256Of(proxy.imagePath("crc", 1))
		_, _, state := imageState(proxy, "crc")
		return err == nil && got == sum, fmt.Sprintf("sha256 %s (err %v); %s", got, err, state)
	})
	// The whole bad hash block comes again, not only the damaged part.
	waitFor(t, 60*time.Second, "the proxy to fetch the bad 16 MiB hash block again and report the image complete", func() (bool, string) {
		img, st, state := imageState(proxy, "crc")
		return img != nil && img.Complete == 100 && !fileExists(proxy.imagePath("crc", 1)+".map") && st.BytesReceived-recv0 >= 16*mib,
			fmt.Sprintf("%s; fetched since SIGUSR1: %d", state, st.BytesReceived-recv0)
	})
	time.Sleep(time.Second)
	recv := proxy.query().BytesReceived - recv0
	t.Logf("the proxy fetched %d bytes to repair the block", recv)
	if recv > 24*mib {
		t.Errorf("the proxy fetched %d bytes for the repair, want only the bad 16 MiB hash block (16-24 MiB)", recv)
	}
	if got, _ := testutil.SHA256Of(proxy.imagePath("crc", 1)); got != sum {
		t.Errorf("proxy's copy after the repair: sha256 %s, want %s", got, sum)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
