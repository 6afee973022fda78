package kernel

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// The Linux kernel's iSCSI initiator (iscsi_tcp, driven by open-iscsi's
// iscsid and iscsiadm) against dnbd3-server's iSCSI target. The suite
// "iscsi" of suites.sh boots with the modules and copies the host's
// open-iscsi binaries into the VM.

const vmInitiator = "iqn.2025-01.test:vm-initiator"

// requireISCSI skips unless the kernel initiator can run here.
func requireISCSI(t *testing.T) {
	t.Helper()
	requireVM(t)
	if _, err := os.Stat("/sys/module/iscsi_tcp"); err != nil {
		t.Skip("SKIP: iscsi_tcp is not loaded (vmtest.sh -mod iscsi_tcp -mod sd_mod; suites.sh runs this as the iscsi suite)")
	}
	for _, b := range []string{"iscsid", "iscsiadm"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("SKIP: %s is not in the VM (vmtest.sh -hostbin %s; package open-iscsi on the host)", b, b)
		}
	}
}

// startIscsid prepares open-iscsi's files and runs iscsid in the
// foreground.
func startIscsid(t *testing.T) {
	t.Helper()
	for _, d := range []string{"/etc/iscsi/nodes", "/etc/iscsi/send_targets", "/run/lock/iscsi", "/var/lib/iscsi"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// iscsid answers only callers it finds in the user database.
	if _, err := os.Stat("/etc/passwd"); err != nil {
		os.WriteFile("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
		os.WriteFile("/etc/group", []byte("root:x:0:\n"), 0o644)
	}
	files := map[string]string{
		"/etc/iscsi/initiatorname.iscsi": "InitiatorName=" + vmInitiator + "\n",
		// The defaults, with the session recovery timeout short: a
		// test that fails must not wait two minutes for the kernel.
		"/etc/iscsi/iscsid.conf": "node.startup = manual\nnode.session.timeo.replacement_timeout = 15\n" +
			"node.conn[0].timeo.noop_out_interval = 5\nnode.conn[0].timeo.noop_out_timeout = 5\n",
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	p := start(t, nil, "iscsid", "-f")
	// iscsid answers iscsiadm once its control socket is up.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := exec.Command("iscsiadm", "-m", "session").CombinedOutput()
		if err == nil || strings.Contains(string(out), "No active sessions") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("iscsid does not answer: %v\n%s\niscsid:\n%s", err, out, p.output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// iscsiadm runs iscsiadm and fails the test on an error.
func iscsiadm(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("iscsiadm", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("iscsiadm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// iscsiLogin logs in to target at portal and returns the SCSI disk that
// appears; cleanup logs out.
func iscsiLogin(t *testing.T, target, portal string) string {
	t.Helper()
	before, _ := filepath.Glob("/sys/block/sd*")
	iscsiadm(t, "-m", "node", "-T", target, "-p", portal, "--login")
	t.Cleanup(func() {
		exec.Command("iscsiadm", "-m", "node", "-T", target, "-p", portal, "--logout").Run()
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		now, _ := filepath.Glob("/sys/block/sd*")
		for _, d := range now {
			if !containsStr(before, d) {
				dev := "/dev/" + filepath.Base(d)
				if _, err := os.Stat(dev); err == nil && sysSize(d) > 0 {
					return dev
				}
			}
		}
		if time.Now().After(deadline) {
			out, _ := exec.Command("iscsiadm", "-m", "session", "-P", "3").CombinedOutput()
			t.Fatalf("no SCSI disk appeared after the login to %s:\n%s", target, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func containsStr(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

// sysSize returns a block device's size in 512-byte sectors.
func sysSize(sysDir string) int64 {
	b, err := os.ReadFile(filepath.Join(sysDir, "size"))
	if err != nil {
		return 0
	}
	var n int64
	fmt.Sscan(strings.TrimSpace(string(b)), &n)
	return n
}

// sysAttr returns a trimmed sysfs attribute of a SCSI disk.
func sysAttr(dev, attr string) string {
	b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), attr))
	return strings.TrimSpace(string(b))
}

// rpcClients returns the server's RPC client list.
func rpcClients(t *testing.T, addr string) []map[string]any {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/query?q=clients")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Clients []map[string]any `json:"clients"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r.Clients
}

// rpcStatsReceived returns the bytes a server received from its uplinks.
func rpcStatsReceived(t *testing.T, addr string) uint64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/query?q=stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		BytesReceived uint64 `json:"bytesReceived"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r.BytesReceived
}

// checkDisk checks an attached image: read-only, the reference's INQUIRY
// identity, the ext4 filesystem mounts and its files verify, the whole
// device equals the image file.
func checkDisk(t *testing.T, dev string, sums map[string]string, want string) {
	t.Helper()
	if ro := sysAttr(dev, "ro"); ro != "1" {
		t.Errorf("%s is not read-only (ro=%q): the WP bit of MODE SENSE", dev, ro)
	}
	if v, m := sysAttr(dev, "device/vendor"), sysAttr(dev, "device/model"); v != "UNI FRBG" || m != "fs" {
		t.Errorf("%s: vendor %q model %q", dev, v, m)
	}
	mnt := mountDev(t, dev, "-o", "ro,noload")
	verifyTree(t, mnt, sums)
	umount(t, mnt)
	dropCaches()
	if got, err := readDevice(dev, nil); err != nil || got != want {
		t.Fatalf("reading all of %s: %v (sha256 %s, want %s)", dev, err, got, want)
	}
}

// TestISCSIKernelInitiator: discovery and login with iscsiadm, the ext4
// image mounts read-only and its files verify, the RPC lists the session
// with the initiator's name; then the same through a proxy that had
// nothing cached, which fetches the blocks from its uplink.
func TestISCSIKernelInitiator(t *testing.T) {
	requireISCSI(t)
	sums := readManifest(t)
	want := testutil.SHA256File(t, "/testdata/images/fs.r1")
	_, addr := server(t, "/testdata/images")
	startIscsid(t)

	out := iscsiadm(t, "-m", "discovery", "-t", "sendtargets", "-p", addr)
	target := "iqn.2025-01.com.github.dnbd3go:fs:1"
	if !strings.Contains(out, addr+",1 "+target) {
		t.Fatalf("discovery did not list %s at %s:\n%s", target, addr, out)
	}
	dev := iscsiLogin(t, target, addr)
	t.Logf("logged in to %s: %s", target, dev)
	var found bool
	for _, c := range rpcClients(t, addr) {
		found = found || c["initiator"] == vmInitiator
	}
	if !found {
		t.Errorf("the RPC client list has no session of %s: %v", vmInitiator, rpcClients(t, addr))
	}
	checkDisk(t, dev, sums, want)
	iscsiadm(t, "-m", "node", "-T", target, "-p", addr, "--logout")
	waitGone(t, dev)

	// Through a proxy with nothing cached: the node is entered by hand
	// (the proxy's discovery lists only images it has).
	proxyBase := t.TempDir()
	_, proxyAddr := serverWith(t, proxyBase, "isProxy=true\nbackgroundReplication=false\n",
		fmt.Sprintf("[%s]\ncomment=origin\nfor=replication\n", addr))
	iscsiadm(t, "-m", "node", "-o", "new", "-T", target, "-p", proxyAddr)
	pdev := iscsiLogin(t, target, proxyAddr)
	part := rpcImage(t, proxyAddr, "fs")
	t.Logf("proxy after the login: complete %d%%, bytesReceived %d", part.Complete, part.BytesReceived)
	checkDisk(t, pdev, sums, want)
	if full := rpcImage(t, proxyAddr, "fs"); full.Complete != 100 {
		t.Errorf("the proxy's copy is not complete after a full read: %+v", full)
	}
	if got := rpcStatsReceived(t, proxyAddr); got < 48<<20 {
		t.Errorf("the proxy received %d bytes from its uplink, want the whole image", got)
	}
	if got := testutil.SHA256File(t, filepath.Join(proxyBase, "fs.r1")); got != want {
		t.Errorf("the proxy's copy after a full read differs from the origin")
	}
	iscsiadm(t, "-m", "node", "-T", target, "-p", proxyAddr, "--logout")
	waitGone(t, pdev)
}

// waitGone waits until a device disappeared after a logout.
func waitGone(t *testing.T, dev string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev))); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still there 20 s after the logout", dev)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
