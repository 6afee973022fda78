package netns

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// The incremental revisions scenario (issue 16) runs on a faster link
// than the others. Its image is 256 MiB (16 hash blocks) by default, so
// that the test takes about 25 s; DNBD3_INCR_SIZE=1G (any size in MiB
// or GiB that is a multiple of 64 MiB) runs the full-size measurement
// of the issue: 1 GiB moves about 2.1 GiB from central to room B, about
// 75 s on the 2-core development machine. bench/65-incremental.sh
// measures the 1 GiB case too.
const (
	incrLinkMbit    = 500
	incrDefaultSize = 256 << 20
	hashBlock       = protocol.HashBlockSize
)

// incrSize returns the image size of TestIncrementalRevisions:
// DNBD3_INCR_SIZE ("1G", "512M") or the default.
func incrSize(t *testing.T) int64 {
	t.Helper()
	v := os.Getenv("DNBD3_INCR_SIZE")
	if v == "" {
		return incrDefaultSize
	}
	unit := int64(1 << 20)
	switch {
	case strings.HasSuffix(v, "G"):
		unit, v = 1<<30, strings.TrimSuffix(v, "G")
	case strings.HasSuffix(v, "M"):
		v = strings.TrimSuffix(v, "M")
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 || n*unit%(4*hashBlock) != 0 || n*unit > 16<<30 {
		t.Fatalf("DNBD3_INCR_SIZE=%q: want a multiple of 64 MiB up to 16G, like 1G or 512M", os.Getenv("DNBD3_INCR_SIZE"))
	}
	return n * unit
}

// write is one write of a COW session: n bytes of pattern at off.
type write struct {
	off, n  int64
	pattern byte
}

// touchedHashBlocks returns the number of 16 MiB hash blocks the writes
// touch.
func touchedHashBlocks(ws []write) int {
	seen := map[int64]bool{}
	for _, w := range ws {
		for hb := w.off / hashBlock; hb <= (w.off+w.n-1)/hashBlock; hb++ {
			seen[hb] = true
		}
	}
	return len(seen)
}

// merger is dnbd3-merger in central, merging into the origin's basePath.
type merger struct {
	addr string // host:port inside central
	logf string
}

func startMerger(t *testing.T, tp *topology, base string) *merger {
	t.Helper()
	m := &merger{addr: "127.0.0.1:5010", logf: filepath.Join(t.TempDir(), "merger.log")}
	lf, err := os.Create(m.logf)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", tp.central, filepath.Join(binDir, "dnbd3-merger"), "--settings", "",
		"--working-dir", t.TempDir(), "--original-dir", base, "--destination-dir", base,
		"--listen", "http://"+m.addr, "--min-free-space", "0")
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); lf.Close(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			b, _ := os.ReadFile(m.logf)
			t.Logf("--- merger log ---\n%s", b)
		}
	})
	if err := waitListening(tp.central, m.addr, 10*time.Second); err != nil {
		t.Fatalf("dnbd3-merger does not listen on %s in central: %v", m.addr, err)
	}
	return m
}

// cowSession writes ws into a copy-on-write session on image:rid in
// central (`dnbd3-nbd serve -c DIR -C MERGER -m`, written by qemu-io over
// its NBD socket) and stops it: the final upload and the merge request
// go to the merger, which makes revision rid+1 in origin's basePath. It
// waits for that file.
func cowSession(t *testing.T, tp *topology, origin *server, m *merger, image string, rid int, ws []write) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command("ip", "netns", "exec", tp.central, filepath.Join(binDir, "dnbd3-nbd"), "serve",
		"-h", "127.0.0.1", "-i", image, "-r", fmt.Sprint(rid), "--listen", "unix:"+sock,
		"-c", t.TempDir(), "-C", m.addr, "-m", "--upload-delay", "0")
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	t.Cleanup(func() { cmd.Process.Kill() })
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil {
		t.Fatalf("dnbd3-nbd serve printed no socket: %v\n%s", err, stderr.String())
	}
	go func() { done <- cmd.Wait() }()
	args := []string{"-f", "raw"}
	for _, w := range ws {
		args = append(args, "-c", fmt.Sprintf("write -q -P %d %d %d", w.pattern, w.off, w.n))
	}
	args = append(args, "-c", "flush", "nbd+unix:///?socket="+sock)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io (killed after 120 s): %v\n%s", err, out)
	}
	cmd.Process.Signal(os.Interrupt) // final upload, then the merge request
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dnbd3-nbd serve -c -m: %v\n%s", err, stderr.String())
		}
	case <-time.After(120 * time.Second):
		t.Fatalf("dnbd3-nbd serve did not finish its upload within 120 s\n%s", stderr.String())
	}
	next := origin.imagePath(image, rid+1)
	waitFor(t, 120*time.Second, "the merger to produce "+next, func() (bool, string) {
		return fileExists(next), "not there yet"
	})
	if !fileExists(next + ".crc") {
		t.Fatalf("%s appeared without its .crc", next)
	}
	// The merge put the writes where they belong.
	f, err := os.Open(next)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range ws {
		b := make([]byte, w.n)
		if _, err := f.ReadAt(b, w.off); err != nil || !bytes.Equal(b, bytes.Repeat([]byte{w.pattern}, int(w.n))) {
			t.Fatalf("%s does not hold the write of %d bytes at %d: %v", next, w.n, w.off, err)
		}
	}
}

// linkRx returns the bytes room B has received on the shaped link.
func linkRx(t *testing.T, tp *topology) int64 {
	t.Helper()
	out, err := exec.Command("ip", "-n", tp.roomB, "-s", "-j", "link", "show", "wan0").Output()
	if err != nil {
		t.Fatalf("ip -s link show wan0 in room B: %v", err)
	}
	var links []struct {
		Stats64 struct {
			Rx struct {
				Bytes int64 `json:"bytes"`
			} `json:"rx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -s -j link show: %v: %s", err, out)
	}
	return links[0].Stats64.Rx.Bytes
}

// replication is what one replication of a revision by proxy B cost.
type replication struct {
	took        time.Duration
	linkBytes   int64  // received by room B on the link
	fetched     uint64 // proxy stats.bytesReceived delta
	bytesReused uint64 // the image's RPC bytesReused
}

// replicate has a room B client read 4 KiB of image:rid through proxy B
// at off (which starts the clone and, with backgroundReplication, the
// replication) and waits until the proxy holds the revision complete and
// identical to the origin's.
func replicate(t *testing.T, tp *topology, origin, proxy *server, image string, rid int, off int64) replication {
	t.Helper()
	rx0, st0 := linkRx(t, tp), proxy.query()
	start := time.Now()
	mustGet(t, fmt.Sprintf("read of r%d through the proxy", rid), tp.roomB, proxy.addr(), image, "", 60*time.Second,
		"-S", "-r", fmt.Sprint(rid), "--offset", fmt.Sprint(off), "--length", "4K")
	path := proxy.imagePath(image, rid)
	waitFor(t, 240*time.Second, fmt.Sprintf("proxy B to replicate %s r%d completely", image, rid), func() (bool, string) {
		st, err := proxy.tryQuery()
		if err != nil {
			return false, err.Error()
		}
		for _, img := range st.Images {
			if img.Name == image && img.RID == rid {
				return img.Complete == 100 && !fileExists(path+".map"), fmt.Sprintf("complete %d%%, .map exists %v", img.Complete, fileExists(path+".map"))
			}
		}
		return false, "not listed"
	})
	r := replication{took: time.Since(start), linkBytes: linkRx(t, tp) - rx0}
	st := proxy.query()
	r.fetched = st.BytesReceived - st0.BytesReceived
	body, err := proxy.httpGet("/query?q=images")
	if err != nil {
		t.Fatal(err)
	}
	var q struct {
		Images []struct {
			Name        string `json:"name"`
			RID         int    `json:"rid"`
			BytesReused uint64 `json:"bytesReused"`
		} `json:"images"`
	}
	json.Unmarshal(body, &q)
	for _, img := range q.Images {
		if img.Name == image && img.RID == rid {
			r.bytesReused = img.BytesReused
		}
	}
	want, err := testutil.SHA256Of(origin.imagePath(image, rid))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := testutil.SHA256Of(path); err != nil || got != want {
		t.Fatalf("proxy B's copy of %s r%d: sha256 %s (err %v), the origin's %s", image, rid, got, err, want)
	}
	return r
}

// incrRun is the state of TestIncrementalRevisions: the topology, the
// servers, the merger and the figures of r1's full replication.
type incrRun struct {
	t             *testing.T
	tp            *topology
	origin, proxy *server
	m             *merger
	size          int64
	full          replication
}

// report logs the figures of one replication against the image size,
// the bytes ws changed, the hash blocks they touched and r1's full
// replication, and the proxy's summary of the reuse walk.
func (ir *incrRun) report(name string, r replication, ws []write, logOff int) {
	var changed int64
	for _, w := range ws {
		changed += w.n
	}
	touched := int64(touchedHashBlocks(ws)) * hashBlock
	ir.t.Logf("%s: %d bytes over the link = %.3f of the image, %.2fx the %d bytes changed, %.2fx the %d bytes of the %d hash blocks touched; "+
		"proxy fetched %d, reused %d; %v = %.2f of r1's full replication (%v)",
		name, r.linkBytes, float64(r.linkBytes)/float64(ir.size), float64(r.linkBytes)/float64(changed), changed,
		float64(r.linkBytes)/float64(touched), touched, touched/hashBlock, r.fetched, r.bytesReused,
		r.took.Round(time.Millisecond), r.took.Seconds()/ir.full.took.Seconds(), ir.full.took.Round(time.Millisecond))
	for _, l := range strings.Split(ir.proxy.readLog()[logOff:], "\n") {
		if strings.Contains(l, "hash blocks (") || strings.Contains(l, "nothing to reuse") {
			ir.t.Logf("  proxy: %s", l)
		}
	}
}

// step makes revision rid+1 from rid with the writes ws (a COW session
// and the merger), has proxy B replicate it reading at off, and reports.
func (ir *incrRun) step(name string, rid int, ws []write, off int64, before func()) replication {
	cowSession(ir.t, ir.tp, ir.origin, ir.m, "lab", rid, ws)
	if before != nil {
		before()
	}
	logOff := len(ir.proxy.readLog())
	r := replicate(ir.t, ir.tp, ir.origin, ir.proxy, "lab", rid+1, off)
	ir.report(name, r, ws, logOff)
	return r
}

// TestIncrementalRevisions (issue 16): an image lab.r1 with its .crc
// (256 MiB, or DNBD3_INCR_SIZE) is replicated in full by proxy B over the
// shaped link. The merger, fed by COW sessions, then makes
//
//	r2: r1 with a contiguous 40 MiB region changed (4 hash blocks),
//	r3: r2 with 2,000 scattered 4 KiB blocks changed,
//	r4: r3 with 1 MiB changed, while proxy B's copy of r3 has a flipped
//	    byte in a hash block r4 did not change.
//
// Proxy B replicates each new revision reusing the previous one. Asserted:
// every replicated revision's sha256 equals the origin's; for r2 the
// bytes over the link are at most 1.2 times the hash blocks the change
// touched, and the rest was reused (RPC bytesReused); for r4 the corrupt
// block failed its check after the copy and was fetched again. Logged:
// the figures of each replication against the image size, the changed
// bytes and the time of r1's full replication.
func TestIncrementalRevisions(t *testing.T) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		requireNetns(t)
		t.Skip("SKIP: qemu-io not installed (package qemu-utils): it writes the COW sessions")
	}
	ir := &incrRun{t: t, size: incrSize(t)}
	ir.tp = newTopologyAt(t, false, incrLinkMbit)
	ir.origin = newServer(t, "origin", ir.tp.central, centralIP, serverConf{})
	makeImage(t, ir.origin.base, "lab", ir.size)
	if out, err := exec.Command(filepath.Join(binDir, "dnbd3-server"), "--crc", ir.origin.imagePath("lab", 1)).CombinedOutput(); err != nil {
		t.Fatalf("dnbd3-server --crc: %v\n%s", err, out)
	}
	ir.origin.start()
	ir.m = startMerger(t, ir.tp, ir.origin.base)
	ir.proxy = startProxyB(t, ir.tp, ir.origin.addr(), "true", 16)

	ir.full = replicate(t, ir.tp, ir.origin, ir.proxy, "lab", 1, 0)
	t.Logf("image %d MiB, link %d Mbit/s; r1 full replication: %d bytes over the link (%.3f of the image) in %v",
		ir.size>>20, incrLinkMbit, ir.full.linkBytes, float64(ir.full.linkBytes)/float64(ir.size), ir.full.took.Round(time.Millisecond))
	ir.contiguous()
	ir.scattered()
	ir.corruptSource()
}

// contiguous: r2 is r1 with 40 MiB changed from 12 MiB into the image's
// second quarter (not aligned to hash blocks: 4 of them touched, as for
// 300 MiB to 340 MiB of a 1 GiB image).
func (ir *incrRun) contiguous() {
	t := ir.t
	ws := []write{{off: ir.size/4 + 3*hashBlock/4, n: 40 << 20, pattern: 0x5a}}
	r2 := ir.step("r2 (contiguous 40 MiB)", 1, ws, ws[0].off, nil)
	touched := int64(touchedHashBlocks(ws)) * hashBlock
	if limit := touched * 12 / 10; r2.linkBytes > limit {
		t.Errorf("replicating r2 took %d bytes over the link, more than 1.2x the %d bytes of the hash blocks the change touched", r2.linkBytes, touched)
	}
	if want := uint64(ir.size - touched); r2.bytesReused != want {
		t.Errorf("RPC bytesReused of r2 = %d, want the %d bytes of the untouched hash blocks", r2.bytesReused, want)
	}
}

// scattered: r3 is r2 with 2,000 scattered 4 KiB blocks changed.
func (ir *incrRun) scattered() {
	rng := rand.New(rand.NewPCG(16, 2000))
	var ws []write
	for _, b := range rng.Perm(int(ir.size / 4096))[:2000] {
		ws = append(ws, write{off: int64(b) * 4096, n: 4096, pattern: byte(1 + len(ws)%250)})
	}
	ir.step(fmt.Sprintf("r3 (2,000 scattered 4 KiB blocks, %d of %d hash blocks touched)", touchedHashBlocks(ws), ir.size/hashBlock), 2, ws, ws[0].off, nil)
}

// corruptSource: r4 is r3 with 1 MiB changed in the hash block at two
// thirds of the image; proxy B's r3 has a flipped byte in the hash block
// at a sixth, which r4 did not change: its copy fails the CRC check and
// the block is fetched again.
func (ir *incrRun) corruptSource() {
	t := ir.t
	nhb := ir.size / hashBlock
	changedHB, corruptHB := 2*nhb/3, nhb/6
	ws := []write{{off: changedHB*hashBlock + 5<<20, n: 1 << 20, pattern: 0x77}}
	logOff := len(ir.proxy.readLog())
	r4 := ir.step("r4 (1 MiB, the proxy's r3 corrupt in another hash block)", 3, ws, ws[0].off, func() {
		testutil.FlipByte(t, ir.proxy.imagePath("lab", 3), corruptHB*hashBlock+12345)
	})
	if l := ir.proxy.readLog()[logOff:]; !strings.Contains(l, "failed its check; fetching it from the uplink") || !regexp.MustCompile(fmt.Sprintf(`\bblock=%d\b`, corruptHB)).MatchString(l) {
		t.Errorf("proxy B did not log the failed check of hash block %d copied from the corrupt r3: %s", corruptHB, lastLines(l, 10))
	}
	if want := uint64(ir.size - 2*hashBlock); r4.bytesReused != want {
		t.Errorf("RPC bytesReused of r4 = %d, want %d (all but the changed and the corrupt hash block)", r4.bytesReused, want)
	}
	if r4.fetched < 2*hashBlock || r4.fetched > 2*hashBlock+1<<20 {
		t.Errorf("proxy B fetched %d bytes for r4, want the changed and the corrupt hash block (%d)", r4.fetched, 2*hashBlock)
	}
}
