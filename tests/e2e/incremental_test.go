package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// mergedRevision makes lab.r1 (40 MiB: hash blocks of 16, 16 and 8 MiB)
// with its .crc in a new base path, and lab.r2 through the real chain: a
// COW session of `dnbd3-nbd serve -c -C -m` written by qemu-io (1 MiB at
// 20 MiB, in hash block 1) and merged by dnbd3-merger. It returns the
// base path, the daemon serving it and both revisions' content.
func mergedRevision(t *testing.T) (base string, d *daemon, r1, r2 []byte) {
	t.Helper()
	needTool(t, "qemu-io", "qemu-utils")
	base = t.TempDir()
	r1 = randomImage(t, filepath.Join(base, "lab.r1"), 40<<20)
	if _, stderr, code := run(t, "dnbd3-server", "--crc", filepath.Join(base, "lab.r1")); code != 0 {
		t.Fatalf("dnbd3-server --crc: %s", stderr)
	}
	d = startDaemon(t, base)
	merger := startMerger(t, base)
	uri, stop := startServe(t, d.addr, "lab", "-r", "1", "-c", t.TempDir(), "-C", merger, "-m", "--upload-delay", "0")
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 20M 1M", "-c", "flush", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	if err := stop(); err != nil {
		t.Fatalf("serve: %v", err)
	}
	waitFile(t, filepath.Join(base, "lab.r2"), 60*time.Second)
	// The list was in place before the revision appeared.
	if _, err := os.Stat(filepath.Join(base, "lab.r2.crc")); err != nil {
		t.Fatalf("lab.r2 appeared without its CRC list: %v", err)
	}
	r2 = bytes.Clone(r1)
	copy(r2[20<<20:], bytes.Repeat([]byte{0x5a}, 1<<20))
	if got, _ := os.ReadFile(filepath.Join(base, "lab.r2")); !bytes.Equal(got, r2) {
		t.Fatal("lab.r2 is not lab.r1 with the write")
	}
	return base, d, r1, r2
}

// TestMergedRevisionCRCList: the merger writes lab.r2.crc; it is the
// file the reference's `dnbd3-server --crc` (and ours) computes for
// lab.r2, and the reference server loads lab.r2 with it and serves it:
// GET_CRC32 answers with the list, the data reads back right.
func TestMergedRevisionCRCList(t *testing.T) {
	base, _, _, r2 := mergedRevision(t)
	got, err := os.ReadFile(filepath.Join(base, "lab.r2.crc"))
	if err != nil {
		t.Fatal(err)
	}
	crcOf := func(server string) []byte {
		t.Helper()
		dir := t.TempDir()
		p := filepath.Join(dir, "copy.r2")
		os.WriteFile(p, r2, 0o644)
		if out, err := exec.Command(server, "--crc", p).CombinedOutput(); err != nil {
			t.Fatalf("%s --crc: %v\n%s", server, err, out)
		}
		b, err := os.ReadFile(p + ".crc")
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if want := crcOf(bin("dnbd3-server")); !bytes.Equal(got, want) {
		t.Fatalf("lab.r2.crc differs from what our dnbd3-server --crc computes")
	}

	ref := filepath.Join(testutil.SharedDir(t), "peers", "dnbd3-ref", "dnbd3-server")
	addr, why := startReference(t, base)
	if why != "" {
		t.Skipf("SKIP (the reference parts): %s", why)
	}
	if want := crcOf(ref); !bytes.Equal(got, want) {
		t.Fatalf("lab.r2.crc differs from what the reference's dnbd3-server --crc computes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	img, err := client.Open(ctx, client.Config{Servers: []string{addr}, Image: "lab", RID: 2, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatalf("the reference server does not serve lab.r2: %v", err)
	}
	defer img.Close()
	list, err := img.CRCList(ctx)
	if err != nil || list == nil {
		t.Fatalf("the reference server has no CRC list for lab.r2 (it did not load lab.r2.crc): %v", err)
	}
	if !bytes.Equal(protocol.MarshalCRCList(list), got) {
		t.Fatal("the reference server's list for lab.r2 is not lab.r2.crc")
	}
	if data := readAll(t, img, nil); !bytes.Equal(data, r2) {
		t.Fatal("the reference server serves other data for lab.r2")
	}
}

// TestGetReuseMergedRevision: `dnbd3-nbd get -r 2 --reuse lab.r1` takes
// the two unchanged hash blocks (24 MiB) from the local file and fetches
// only the changed one: the server sends 16 MiB, the result is lab.r2.
func TestGetReuseMergedRevision(t *testing.T) {
	base, d, _, r2 := mergedRevision(t)
	sent0 := d.query(t, "stats")["bytesSent"].(float64)
	out := filepath.Join(t.TempDir(), "lab.r2")
	_, stderr, code := run(t, "dnbd3-nbd", "get", "-h", d.addr, "-i", "lab", "-r", "2", "--reuse", filepath.Join(base, "lab.r1"), "-o", out, "-q")
	if code != 0 {
		t.Fatalf("get --reuse: exit %d: %s", code, stderr)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, r2) {
		t.Fatal("get --reuse wrote something other than lab.r2")
	}
	if !strings.Contains(stderr, "reused 25165824 bytes (2 of 3 hash blocks)") {
		t.Errorf("summary %q", stderr)
	}
	if sent := d.query(t, "stats")["bytesSent"].(float64) - sent0; sent < 16<<20 || sent > 16<<20+1<<20 {
		t.Errorf("the server sent %.0f bytes, want the changed 16 MiB hash block", sent)
	}
}

// TestProxyReusesWithReferenceUplink: the reference server serves lab.r1
// and the merged lab.r2 with their .crc files; our proxy, which holds a
// replicated lab.r1 with its list, replicates lab.r2 from it: the two
// unchanged hash blocks (24 MiB) are copied from lab.r1, only the changed
// one is fetched, with the protocol the reference speaks (GET_CRC32,
// GET_BLOCK). RPC bytesReused and bytesReceived say so; the copy is lab.r2.
func TestProxyReusesWithReferenceUplink(t *testing.T) {
	base, _, r1, r2 := mergedRevision(t)
	ref, why := startReference(t, base)
	if why != "" {
		t.Skipf("SKIP: %s", why)
	}
	pbase := t.TempDir()
	for _, f := range []string{"lab.r1", "lab.r1.crc"} {
		b, err := os.ReadFile(filepath.Join(base, f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(pbase, f), b, 0o644)
	}
	os.WriteFile(filepath.Join(pbase, "lab.r1.meta"), []byte("[main]\natime=1700000000\n"), 0o644)
	proxy := startDaemonWith(t, pbase, "isProxy=true\nbackgroundReplication=true\nbgrWindowSize=8\n",
		map[string]string{"alt-servers": "[" + ref + "]\ncomment=reference\nfor=replication\n"})
	if _, stderr, code := run(t, "dnbd3-nbd", "get", "-h", proxy.addr, "-i", "lab", "-r", "2", "--offset", "20M", "--length", "4K", "-o", os.DevNull, "-q"); code != 0 {
		t.Fatalf("read of lab.r2 through the proxy: exit %d: %s", code, stderr)
	}
	copyPath := filepath.Join(pbase, "lab.r2")
	var reused, complete float64
	deadline := time.Now().Add(60 * time.Second)
	for {
		reused, complete = -1, -1
		for _, v := range proxy.query(t, "images")["images"].([]any) {
			img := v.(map[string]any)
			if img["name"] == "lab" && img["rid"].(float64) == 2 {
				reused, _ = img["bytesReused"].(float64)
				complete, _ = img["complete"].(float64)
			}
		}
		if _, err := os.Stat(copyPath + ".map"); complete == 100 && os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxy did not complete lab.r2 within 60 s: complete %v, bytesReused %v", complete, reused)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if want := float64(len(r1) - protocol.HashBlockSize); reused != want {
		t.Errorf("RPC bytesReused of lab.r2 = %.0f, want %.0f (the two unchanged hash blocks)", reused, want)
	}
	if recv := proxy.query(t, "stats")["bytesReceived"].(float64); recv < protocol.HashBlockSize || recv > protocol.HashBlockSize+1<<20 {
		t.Errorf("the proxy received %.0f bytes from the reference, want the changed hash block (%d)", recv, protocol.HashBlockSize)
	}
	if got, _ := os.ReadFile(copyPath); !bytes.Equal(got, r2) {
		t.Fatal("the proxy's lab.r2 is not the reference's")
	}
}
