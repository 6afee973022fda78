package kernel

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// proxyImage is one entry of a server's RPC `images` list.
type proxyImage struct {
	Name          string `json:"name"`
	Complete      int    `json:"complete"`
	BytesReceived uint64 `json:"bytesReceived"`
	UplinkServer  string `json:"uplinkServer"`
}

// rpcImage returns the RPC entry of image name on the server at addr.
func rpcImage(t *testing.T, addr, name string) proxyImage {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/query?q=images")
	if err != nil {
		t.Fatalf("RPC of %s: %v", addr, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r struct {
		Images []proxyImage `json:"images"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("RPC of %s is not JSON: %v: %.300s", addr, err, body)
	}
	for _, img := range r.Images {
		if img.Name == name {
			return img
		}
	}
	t.Fatalf("RPC of %s does not list %q: %.300s", addr, name, body)
	return proxyImage{}
}

// TestAttachThroughProxy attaches an image through a caching proxy
// (isProxy=true, no background replication) that does not have it yet:
// mounting the ext4 filesystem and reading its files fetches only part of
// the image from the origin; a full read of the device completes the
// proxy's copy, which then equals the origin's file; after the origin is
// killed the device still reads correctly from the proxy alone.
func TestAttachThroughProxy(t *testing.T) {
	requireNBD(t)
	sums := readManifest(t)
	want := testutil.SHA256File(t, "/testdata/images/fs.r1")
	origin, originAddr := server(t, "/testdata/images")
	proxyBase := t.TempDir()
	_, proxyAddr := serverWith(t, proxyBase,
		"isProxy=true\nbackgroundReplication=false\n",
		fmt.Sprintf("[%s]\ncomment=origin\nfor=replication\n", originAddr))

	_, dev, _ := attachCmd(t, "-h", proxyAddr, "-i", "fs")
	mnt := mountDev(t, dev, "-o", "ro,noload")
	verifyTree(t, mnt, sums)
	umount(t, mnt)
	part := rpcImage(t, proxyAddr, "fs")
	t.Logf("after mounting and reading the files: proxy complete %d%%, bytesReceived %d, uplink %s",
		part.Complete, part.BytesReceived, part.UplinkServer)
	if part.Complete <= 0 || part.Complete >= 100 || part.BytesReceived == 0 {
		t.Errorf("proxy should hold part of the image after the mount: %+v", part)
	}
	if part.UplinkServer != originAddr {
		t.Errorf("proxy uplinkServer %q, want the origin %s", part.UplinkServer, originAddr)
	}

	dropCaches()
	if got, err := readDevice(dev, nil); err != nil || got != want {
		t.Fatalf("full read through the proxy: sha256 %s (err %v), want %s", got, err, want)
	}
	copyPath := filepath.Join(proxyBase, "fs.r1")
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := os.Stat(copyPath + ".map")
		if os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("proxy did not delete %s.map after a full read: %+v", copyPath, rpcImage(t, proxyAddr, "fs"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if full := rpcImage(t, proxyAddr, "fs"); full.Complete != 100 {
		t.Errorf("proxy RPC complete %d after a full read, want 100", full.Complete)
	}
	if got := testutil.SHA256File(t, copyPath); got != want {
		t.Fatalf("proxy's copy sha256 %s, origin's %s", got, want)
	}

	origin.cmd.Process.Signal(syscall.SIGKILL)
	origin.wait(10 * time.Second)
	dropCaches()
	if got, err := readDevice(dev, nil); err != nil || got != want {
		t.Fatalf("read with the origin dead: sha256 %s (err %v), want %s", got, err, want)
	}
	t.Logf("proxy completed its copy from the device reads; the device reads correctly with the origin killed")
}
