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
