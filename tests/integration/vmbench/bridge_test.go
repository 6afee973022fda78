package vmbench

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

// TestBridgeVsModule is the bridge table of issue 11: the same image from
// the same dnbd3-server in the same boot, read through /dev/nbdX
// (`dnbd3-nbd attach`) and through the reference kernel module's
// /dev/dnbd0 (`dnbd3-client`), row by row, sides alternating, medians of
// VMBENCH_ROUNDS (default 3) rounds. Each row prints both figures, their
// ratio and the guest's CPU time per MiB read (all CPUs, from /proc/stat:
// reader, daemon, server, kernel workers).
//
// bench/30-vm.sh boots the reference's kernel with its nbd.ko and
// dnbd3.ko and puts dnbd3-client on the guest's PATH; without them the
// test prints a visible SKIP. Environment: VMBENCH_ROUNDS,
// VMBENCH_SIZE_MB (image size, default 256), VMBENCH_RAND_SECONDS (default
// 3), VMBENCH_ATTACH_ARGS (extra flags for every dnbd3-nbd attach,
// separated by spaces), VMBENCH_VARIANTS (several of our devices side by
// side, see variants), VMBENCH_ROWS (a comma list of the row keys to run:
// seq,seqra,direct,rand1,rand8).
func TestBridgeVsModule(t *testing.T) {
	if os.Getenv("DNBD3GO_VM") != "1" || nbdbridge.Available() != nil {
		t.Skip("SKIP: runs inside the VM harness (bench/30-vm.sh)")
	}
	if _, err := os.Stat("/sys/module/dnbd3"); err != nil {
		fmt.Println("VMBENCH SKIP: the reference module dnbd3.ko is not loaded (bench/30-vm.sh loads it from ../shared/peers/dnbd3-ref-kmod)")
		t.Skip("SKIP: no dnbd3.ko")
	}
	refClient, err := exec.LookPath("dnbd3-client")
	if err != nil {
		fmt.Println("VMBENCH SKIP: dnbd3-client is not on the guest's PATH")
		t.Skip("SKIP: no dnbd3-client")
	}
	rounds := envInt("VMBENCH_ROUNDS", 3)
	size := int64(envInt("VMBENCH_SIZE_MB", 256)) << 20
	randDur := time.Duration(envInt("VMBENCH_RAND_SECONDS", 3)) * time.Second

	base := t.TempDir()
	img := filepath.Join(base, "cmp.r1")
	want := writeRandomImage(t, img, size)
	etc := t.TempDir()
	const port = "15011"
	os.WriteFile(filepath.Join(etc, "server.conf"), []byte("[dnbd3]\nbasePath="+base+"\nlistenPort="+port+"\n[logging]\nconsoleMask=ERROR\n"), 0o644)
	srv := exec.Command("dnbd3-server", "-n", "-c", etc, "-b", "127.0.0.1")
	srv.Stdout, srv.Stderr = os.Stderr, os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	addr := "127.0.0.1:" + port
	if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
		t.Fatalf("dnbd3-server does not listen: %v", err)
	}

	// ours: one device per variant ("name=command args..." separated by
	// ";", default one "nbd=dnbd3-nbd"), then the reference
	var sides []side
	for _, v := range variants() {
		args := []string{"attach", "-h", addr, "-i", "cmp", "--log-level", "warning"}
		args = append(args, strings.Fields(os.Getenv("VMBENCH_ATTACH_ARGS"))...)
		args = append(args, v.args...)
		for i, a := range v.args {
			if a == "-c" && i+1 < len(v.args) { // a COW session directory must exist
				os.MkdirAll(v.args[i+1], 0o755)
			}
		}
		att := exec.Command(v.cmd, args...)
		att.Stderr = os.Stderr
		out, _ := att.StdoutPipe()
		if err := att.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { att.Process.Signal(syscall.SIGTERM); att.Wait() }()
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil {
			t.Fatalf("%s attach printed no device: %v", v.cmd, err)
		}
		sides = append(sides, side{name: v.name, dev: strings.TrimSpace(line)})
	}
	const ref = "/dev/dnbd0"
	if b, err := exec.Command(refClient, "-h", addr, "-i", "cmp", "-d", ref).CombinedOutput(); err != nil {
		t.Fatalf("dnbd3-client: %v\n%s", err, b)
	}
	defer exec.Command(refClient, "-c", "-d", ref).Run()
	if err := waitDevSize(ref, size, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	sides = append(sides, side{name: "dnbd3.ko", dev: ref})
	for _, s := range sides {
		fmt.Printf("VMBENCH %-9s %-11s %s\n", s.name, s.dev, queueInfo(s.dev))
	}

	// Both devices must return the image's bytes.
	for _, s := range sides {
		got, err := hashDevice(s.dev, size)
		if err != nil {
			t.Fatalf("%s: %v", s.dev, err)
		}
		if got != want {
			t.Fatalf("%s returned other bytes than the image (sha256 %x, image %x)", s.dev, got, want)
		}
	}
	fmt.Printf("VMBENCH both devices return the image's %d MiB byte for byte\n", size>>20)

	rows := []row{
		{key: "seq", name: "seq buffered, own defaults (MB/s)", run: func(dev string) result { return seqBuffered(t, dev, size) }},
		{key: "seqra", name: "seq buffered, both RA 512 KiB (MB/s)", raKB: 512, run: func(dev string) result { return seqBuffered(t, dev, size) }},
		{key: "direct", name: "seq O_DIRECT 1 MiB QD1 (MB/s)", run: func(dev string) result { return seqDirect(t, dev, size, 1<<20) }},
		{key: "rand1", name: "rand 4 KiB O_DIRECT 1 thread (IOPS)", iops: true, run: func(dev string) result { return randDirect(t, dev, size, 1, randDur) }},
		{key: "rand8", name: "rand 4 KiB O_DIRECT 8 threads (IOPS)", iops: true, run: func(dev string) result { return randDirect(t, dev, size, 8, randDur) }},
		// writable devices only (COW variants); not in the default rows
		{key: "wr1", name: "rand 4 KiB O_DIRECT writes, 1 thread (IOPS)", iops: true, write: true, run: func(dev string) result { return randWrite(t, dev, size, randDur) }},
	}
	keys := []string{"seq", "seqra", "direct", "rand1", "rand8"}
	if sel := os.Getenv("VMBENCH_ROWS"); sel != "" {
		keys = strings.Split(sel, ",")
	}
	rows = slices.DeleteFunc(rows, func(r row) bool { return !slices.Contains(keys, r.key) })
	type figures struct{ val, cpu, reqKB []float64 }
	res := map[string][]figures{}
	for r := range rounds {
		for ri, rw := range rows {
			if res[rw.key] == nil {
				res[rw.key] = make([]figures, len(sides))
			}
			for n := range sides {
				k := (n + r + ri) % len(sides) // rotate the order
				s := sides[k]
				if rw.write && readOnly(s.dev) {
					continue
				}
				var saved string
				if rw.raKB > 0 {
					saved = setReadAhead(t, s.dev, rw.raKB)
				}
				st0 := devStat(s.dev)
				m := rw.run(s.dev)
				st1 := devStat(s.dev)
				if saved != "" {
					writeSys(queueFile(s.dev, "read_ahead_kb"), saved)
				}
				f := &res[rw.key][k]
				v := m.bytes / m.secs / 1e6
				if rw.iops {
					v = float64(m.ops) / m.secs
				}
				f.val = append(f.val, v)
				f.cpu = append(f.cpu, m.cpu*1000/(m.bytes/(1<<20)))
				if n := st1[0] - st0[0]; n > 0 {
					f.reqKB = append(f.reqKB, float64(st1[2]-st0[2])*512/1024/float64(n))
				}
				fmt.Printf("VMBENCH round %d %-6s %-9s %10.1f  cpu %7.2f ms/MiB\n", r+1, rw.key, s.name, v, f.cpu[len(f.cpu)-1])
			}
		}
	}
	refIdx := len(sides) - 1
	fmt.Printf("VMBENCH\nVMBENCH bridge table, medians of %d rounds; ratios = median over the rounds of side / dnbd3.ko measured in the same round; CPU = guest CPU ms per MiB read\n", rounds)
	hdr := fmt.Sprintf("VMBENCH %-38s", "")
	for _, s := range sides {
		hdr += fmt.Sprintf(" %22s", s.name)
	}
	fmt.Println(hdr + "   avg request KiB")
	for _, rw := range rows {
		f := res[rw.key]
		line := fmt.Sprintf("VMBENCH %-38s", rw.name)
		var req []string
		for k := range sides {
			if len(f[k].val) == 0 {
				line += fmt.Sprintf(" %22s", "-")
				req = append(req, "-")
				continue
			}
			v, c := median(f[k].val), median(f[k].cpu)
			switch {
			case k == refIdx:
				line += fmt.Sprintf(" %9.1f cpu %8.2f", v, c)
			case len(f[refIdx].val) == 0:
				line += fmt.Sprintf(" %7.1f cpu %6.2f ms/MiB", v, c)
			default:
				line += fmt.Sprintf(" %7.1f %4.2fx cpu %4.2fx", v, pairedRatio(f[k].val, f[refIdx].val), pairedRatio(f[k].cpu, f[refIdx].cpu))
			}
			req = append(req, fmt.Sprintf("%.0f", median(f[k].reqKB)))
		}
		fmt.Println(line + "   " + strings.Join(req, "/"))
	}
	fmt.Printf("VMBENCH (the dnbd3.ko column: MB/s or IOPS and its CPU ms/MiB; other columns: value, ratio to dnbd3.ko, CPU ratio to dnbd3.ko)\n")
	// How our devices ran: their slots (kernel-direct or relay, replaced
	// connections) and what the kernel said about them.
	for _, s := range sides[:refIdx] {
		out, _ := exec.Command("dnbd3-nbd", "status", s.dev, "--json").Output()
		var st struct {
			Slots map[string]any `json:"slots"`
		}
		json.Unmarshal(out, &st)
		fmt.Printf("VMBENCH %s %s slots %v\n", s.name, s.dev, st.Slots)
	}
	if out, err := exec.Command("dmesg").Output(); err == nil {
		n := 0
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "nbd") && !strings.Contains(l, "dnbd") && (strings.Contains(l, "timed out") || strings.Contains(l, "failed") || strings.Contains(l, "reconnected")) {
				n++
			}
		}
		fmt.Printf("VMBENCH kernel: %d nbd timeouts, failures or reconnects during the run\n", n)
	}
}

// variant is one of our devices in the comparison.
type variant struct {
	name, cmd string
	args      []string // extra flags of its attach
}

// variants parses VMBENCH_VARIANTS: "name=command [attach flags...]"
// separated by ";", e.g. "nbd=dnbd3-nbd;relay=dnbd3-nbd --kernel-direct=off;
// base=dnbd3-nbd-base" (a binary bench/30-vm.sh built from an older
// revision, VMBENCH_BASE=REV). Default: "nbd=dnbd3-nbd".
func variants() []variant {
	spec := os.Getenv("VMBENCH_VARIANTS")
	if spec == "" {
		spec = "nbd=dnbd3-nbd"
	}
	var out []variant
	for _, v := range strings.Split(spec, ";") {
		name, cmd, ok := strings.Cut(strings.TrimSpace(v), "=")
		if !ok || name == "" {
			continue
		}
		f := strings.Fields(cmd)
		if len(f) == 0 {
			continue
		}
		out = append(out, variant{name: name, cmd: f[0], args: f[1:]})
	}
	return out
}

type side struct{ name, dev string }

type row struct {
	key, name string
	raKB      int  // read-ahead for this row, 0: as attached
	iops      bool // report operations per second instead of MB/s
	write     bool // writable devices only
	run       func(dev string) result
}

// result is one measurement: bytes and operations in secs seconds, and
// the guest's busy CPU seconds meanwhile.
type result struct {
	bytes, secs, cpu float64
	ops              int64
}

// timed runs f and returns its wall time and the guest's busy CPU time.
func timed(f func()) (secs, cpu float64) {
	c0 := busyCPU()
	t0 := time.Now()
	f()
	return time.Since(t0).Seconds(), busyCPU() - c0
}

// busyCPU returns the seconds all CPUs spent not idle (user, nice,
// system, irq, softirq, steal) since boot, from /proc/stat.
func busyCPU() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	var busy float64
	for i, v := range f[1:] {
		n, _ := strconv.ParseFloat(v, 64)
		if i == 3 || i == 4 || i >= 8 { // idle, iowait, guest (already in user)
			continue
		}
		busy += n
	}
	return busy / 100 // USER_HZ
}

// seqBuffered reads the whole device through the page cache in 1 MiB
// read calls, after dropping the caches.
func seqBuffered(t *testing.T, dev string, size int64) result {
	dropCaches(dev)
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	secs, cpu := timed(func() {
		for {
			k, err := f.Read(buf)
			n += int64(k)
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatalf("%s: %v", dev, err)
			}
		}
	})
	if n != size {
		t.Fatalf("%s: read %d bytes, want %d", dev, n, size)
	}
	return result{bytes: float64(n), secs: secs, cpu: cpu, ops: n / int64(len(buf))}
}

// seqDirect reads the whole device with O_DIRECT, bs bytes at a time,
// one read in flight.
func seqDirect(t *testing.T, dev string, size int64, bs int) result {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := testutil.AlignedBuf(t, bs)
	var n int64
	secs, cpu := timed(func() {
		for off := int64(0); off < size; off += int64(bs) {
			k, err := f.ReadAt(buf, off)
			if err != nil {
				t.Fatalf("%s at %d: %v", dev, off, err)
			}
			n += int64(k)
		}
	})
	return result{bytes: float64(n), secs: secs, cpu: cpu, ops: n / int64(bs)}
}

// randDirect reads random 4 KiB blocks with O_DIRECT from threads
// goroutines for d.
func randDirect(t *testing.T, dev string, size int64, threads int, d time.Duration) result {
	var mu sync.Mutex
	var ops int64
	var wg sync.WaitGroup
	secs, cpu := timed(func() {
		stop := time.Now().Add(d)
		for g := range threads {
			wg.Add(1)
			go func() {
				defer wg.Done()
				f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				buf := testutil.AlignedBuf(t, 4096)
				rng := rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano())))
				n := int64(0)
				for time.Now().Before(stop) {
					if _, err := f.ReadAt(buf, rng.Int64N(size/4096)*4096); err != nil {
						t.Errorf("%s: %v", dev, err)
						return
					}
					n++
				}
				mu.Lock()
				ops += n
				mu.Unlock()
			}()
		}
		wg.Wait()
	})
	return result{bytes: float64(ops * 4096), secs: secs, cpu: cpu, ops: ops}
}

// randWrite writes random 4 KiB blocks with O_DIRECT, one at a time, for
// d (the copy-on-write path's per-request latency).
func randWrite(t *testing.T, dev string, size int64, d time.Duration) result {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := testutil.AlignedBuf(t, 4096)
	rng := rand.New(rand.NewPCG(3, uint64(time.Now().UnixNano())))
	var ops int64
	secs, cpu := timed(func() {
		for stop := time.Now().Add(d); time.Now().Before(stop); ops++ {
			if _, err := f.WriteAt(buf, rng.Int64N(size/4096)*4096); err != nil {
				t.Fatalf("%s: %v", dev, err)
			}
		}
	})
	return result{bytes: float64(ops * 4096), secs: secs, cpu: cpu, ops: ops}
}

// readOnly reports whether the block device is read-only.
func readOnly(dev string) bool {
	b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "ro"))
	return strings.TrimSpace(string(b)) != "0"
}

// writeRandomImage writes size pseudo-random bytes and returns their sha256.
func writeRandomImage(t *testing.T, path string, size int64) [32]byte {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(11, 11))
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			v := rng.Uint64()
			for k := range 8 {
				buf[i+k] = byte(v >> (8 * k))
			}
		}
		f.Write(buf)
		h.Write(buf)
	}
	return [32]byte(h.Sum(nil))
}

// hashDevice reads size bytes of dev with O_DIRECT and returns their sha256.
func hashDevice(dev string, size int64) ([32]byte, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return [32]byte{}, err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return [32]byte{}, err
	}
	defer unix.Munmap(buf)
	h := sha256.New()
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil {
			return [32]byte{}, fmt.Errorf("at %d: %w", off, err)
		}
		h.Write(buf)
	}
	return [32]byte(h.Sum(nil)), nil
}

func waitDevSize(dev string, size int64, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
		if err == nil {
			if n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); n*512 == size {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not reach %d bytes within %v", dev, size, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func queueFile(dev, name string) string {
	return filepath.Join("/sys/block", filepath.Base(dev), "queue", name)
}

func writeSys(path, v string) error { return os.WriteFile(path, []byte(v), 0) }

// setReadAhead sets read_ahead_kb and returns the old value.
func setReadAhead(t *testing.T, dev string, kb int) string {
	old, err := os.ReadFile(queueFile(dev, "read_ahead_kb"))
	if err != nil {
		t.Fatal(err)
	}
	if err := writeSys(queueFile(dev, "read_ahead_kb"), strconv.Itoa(kb)); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(old))
}

// queueInfo describes a device's queue settings.
func queueInfo(dev string) string {
	var parts []string
	for _, k := range []string{"read_ahead_kb", "max_sectors_kb", "max_hw_sectors_kb", "nr_requests", "logical_block_size"} {
		b, _ := os.ReadFile(queueFile(dev, k))
		parts = append(parts, k+"="+strings.TrimSpace(string(b)))
	}
	mq, _ := os.ReadDir(filepath.Join("/sys/block", filepath.Base(dev), "mq"))
	parts = append(parts, fmt.Sprintf("hw_queues=%d", len(mq)))
	return strings.Join(parts, " ")
}

// devStat returns reads completed, reads merged and sectors read of dev.
func devStat(dev string) [3]int64 {
	b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	f := strings.Fields(string(b))
	var r [3]int64
	for i := range min(3, len(f)) {
		r[i], _ = strconv.ParseInt(f[i], 10, 64)
	}
	return r
}

// dropCaches empties the page cache of dev (and everything else).
func dropCaches(dev string) {
	if f, err := os.Open(dev); err == nil {
		unix.IoctlSetInt(int(f.Fd()), unix.BLKFLSBUF, 0)
		f.Close()
	}
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

// pairedRatio is the median of a[i]/b[i]: each round's figures were
// measured minutes apart at most, so pairing them cancels the drift of a
// shared machine's load better than a ratio of medians.
func pairedRatio(a, b []float64) float64 {
	var r []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			r = append(r, a[i]/b[i])
		}
	}
	return median(r)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
