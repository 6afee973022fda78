package server

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/iscsitest"
	"github.com/dnbd3go/dnbd3go/server/iscsi"
)

// iscsiLogin logs in to target on the server at addr.
func iscsiLogin(t *testing.T, addr, target string, o iscsitest.Options) *iscsitest.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	o.TargetName = target
	ic, err := iscsitest.Login(c, o)
	if err != nil {
		t.Fatalf("login to %q: %v", target, err)
	}
	return ic
}

// readAll reads a whole disk in 1 MiB commands.
func readAll(t *testing.T, ic *iscsitest.Conn) []byte {
	t.Helper()
	blocks, size, err := ic.Capacity()
	if err != nil || size != 512 {
		t.Fatalf("capacity: %d blocks of %d, %v", blocks, size, err)
	}
	var out []byte
	for lba := uint64(0); lba < blocks; lba += 2048 {
		n := uint32(min(2048, blocks-lba))
		data, err := ic.ReadBlocks(lba, n)
		if err != nil {
			t.Fatalf("read at block %d: %v", lba, err)
		}
		out = append(out, data...)
	}
	return out
}

// Every image is a target: the reference's target names select it
// (NAME:RID after any prefix, the latest revision without a valid rid,
// wwn-0x<WWN>), the discovery lists them all, the data read is the
// image's, and the RPC shows the session with its initiator.
func TestISCSIServesImages(t *testing.T) {
	base := t.TempDir()
	v7 := genImage(t, base, "ubuntu.r7", 3<<20+1234, false)
	v8 := genImage(t, base, "ubuntu.r8", 1<<20, false)
	if err := os.MkdirAll(filepath.Join(base, "sub/dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	sub := genImage(t, base, "sub/dir/img.r2", 12288, false)
	ts := startServer(t, base, "", nil)

	ic := iscsiLogin(t, ts.addr, "iqn.2024-01.org.example:ubuntu:7", iscsitest.Options{InitiatorName: "iqn.2025-01.test:rpc"})
	if got := readAll(t, ic); !bytes.Equal(got, v7) {
		t.Fatalf("ubuntu:7 read back differs (%d bytes, want %d)", len(got), len(v7))
	}
	var q struct {
		ClientCount int `json:"clientCount"`
		Clients     []struct {
			Address   string `json:"address"`
			ImageID   int    `json:"imageId"`
			BytesSent int64  `json:"bytesSent"`
			Initiator string `json:"initiator"`
		} `json:"clients"`
		Images []struct {
			ID    int    `json:"id"`
			Name  string `json:"name"`
			RID   int    `json:"rid"`
			Users int    `json:"users"`
			WWN   uint64 `json:"wwn"`
		} `json:"images"`
	}
	queryJSON(t, ts.addr, "q=stats&q=clients&q=images", &q)
	if q.ClientCount != 1 || len(q.Clients) != 1 || q.Clients[0].Initiator != "iqn.2025-01.test:rpc" ||
		q.Clients[0].Address != ic.Raw().LocalAddr().String() || q.Clients[0].BytesSent < int64(len(v7)) {
		t.Fatalf("RPC clients: %+v", q)
	}
	if _, st := getStatus(t, ts.addr, ""); st["clientCount"] != float64(1) {
		t.Fatalf("/status.json clientCount %v, want 1 (the iSCSI session), as the RPC says", st["clientCount"])
	}
	var wwn uint64
	for _, img := range q.Images {
		if img.ID == q.Clients[0].ImageID && (img.Name != "ubuntu" || img.RID != 7 || img.Users != 1) {
			t.Fatalf("the session's image in the RPC: %+v", img)
		}
		if img.Name == "sub/dir/img" {
			wwn = img.WWN
		}
	}

	// VPD 0x83 carries the RPC's WWN as the NAA designator.
	ic7 := iscsiLogin(t, ts.addr, "ubuntu:7", iscsitest.Options{})
	res, err := ic7.Command([]byte{0x12, 1, 0x83, 0, 255, 0}, 255, nil)
	if err != nil || res.Status != 0 || len(res.Data) < 16 {
		t.Fatalf("VPD 0x83: %v", err)
	}
	for _, img := range q.Images {
		if img.Name == "ubuntu" && binary.BigEndian.Uint64(res.Data[8:]) != img.WWN {
			t.Fatalf("NAA %x, RPC wwn %x", res.Data[8:16], img.WWN)
		}
	}

	names := map[string][]byte{
		"ubuntu":                                v8,
		"ubuntu:0":                              v8,
		"iqn.2024-01.org.example:ubuntu:latest": v8,
		"UBUNTU:7":                              v7, // initiators may lower or upper the case
		"sub/dir/img:2":                         sub,
		"iqn.x:sub/dir/img:2":                   sub,
		iscsi.DiscoveryName("sub/dir/img", 2, wwn): sub,
	}
	for name, want := range names {
		ic := iscsiLogin(t, ts.addr, name, iscsitest.Options{})
		if got := readAll(t, ic); !bytes.Equal(got, want) {
			t.Errorf("%q: data differs (%d bytes, want %d)", name, len(got), len(want))
		}
		ic.Logout()
	}

	dc, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	disc, err := iscsitest.Login(dc, iscsitest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := disc.Text("SendTargets=All")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"TargetName=" + iscsi.TargetPrefix + ":ubuntu:7", "TargetAddress=" + ts.addr + ",1",
		"TargetName=" + iscsi.TargetPrefix + ":ubuntu:8", "TargetAddress=" + ts.addr + ",1",
		"TargetName=" + iscsi.DiscoveryName("sub/dir/img", 2, wwn), "TargetAddress=" + ts.addr + ",1",
	}
	if strings.Join(sortedPairs(list), "|") != strings.Join(sortedPairs(want), "|") {
		t.Fatalf("SendTargets=All:\n got  %q\n want %q", list, want)
	}

	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = iscsitest.Login(c, iscsitest.Options{TargetName: "iqn.x:nosuch:1"})
	var le *iscsitest.LoginError
	if !errors.As(err, &le) || le.Class != 2 || le.Detail != 3 {
		t.Fatalf("unknown target: %v", err)
	}
}

// sortedPairs returns TargetName/TargetAddress pairs joined, sorted.
func sortedPairs(list []string) []string {
	var out []string
	for i := 0; i+1 < len(list); i += 2 {
		out = append(out, list[i]+" "+list[i+1])
	}
	slices.Sort(out)
	return out
}

// iScsiServer=false: the login is closed unanswered, and the start says
// so in the log.
func TestISCSIDisabled(t *testing.T) {
	base := t.TempDir()
	genImage(t, base, "img.r1", 8192, false)
	ts := runServer(t, base, "iScsiServer=false\n", nil, nil)
	if ts.logs.count("iSCSI target disabled (iScsiServer=false): iSCSI logins are closed") != 1 {
		t.Fatal("no log line about the disabled target")
	}
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = iscsitest.Login(c, iscsitest.Options{TargetName: "img:1", Timeout: 5 * time.Second})
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("login with iScsiServer=false: %v", err)
	}
	ts2 := runServer(t, base, "", nil, nil)
	if ts2.logs.count("iSCSI target enabled on the listen port (iScsiServer=true)") != 1 {
		t.Fatal("no log line about the enabled target")
	}
}

// iSCSI sessions count against maxClients like DNBD3 clients.
func TestISCSIMaxClients(t *testing.T) {
	base := t.TempDir()
	genImage(t, base, "img.r1", 8192, false)
	ts := startServer(t, base, "[limits]\nmaxClients=2\n", nil)
	iscsiLogin(t, ts.addr, "img:1", iscsitest.Options{ISID: [6]byte{1}})
	iscsiLogin(t, ts.addr, "img:1", iscsitest.Options{ISID: [6]byte{2}})
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := iscsitest.Login(c, iscsitest.Options{TargetName: "img:1", ISID: [6]byte{3}}); err == nil {
		t.Fatal("a third session with maxClients=2")
	}
}

// Through a proxy that has nothing cached, an iSCSI read takes the DNBD3
// clients' path: the image is cloned on demand, absent blocks are fetched
// from the uplink, and land in the local copy.
func TestISCSIThroughProxy(t *testing.T) {
	obase := t.TempDir()
	want := genImage(t, obase, "img.r3", 5<<20+777, true)
	origin := runServer(t, obase, "", nil, nil)
	proxy := startProxy(t, "", "", "", nil, origin.addr)

	ic := iscsiLogin(t, proxy.addr, "iqn.2025-01.test:img:3", iscsitest.Options{})
	if got := readAll(t, ic); !bytes.Equal(got, want) {
		t.Fatal("data read through the proxy differs")
	}
	img := loaded(t, proxy.Server, "img", 3)
	if cm := img.cache.Load(); cm != nil && !cm.has(0, img.VirtualSize) {
		t.Fatal("the proxy's copy does not have the blocks read")
	}
	local, err := os.ReadFile(img.Path)
	if err != nil || !bytes.Equal(local, want[:len(local)]) {
		t.Fatalf("the local copy differs: %v", err)
	}
	if proxy.bytesRecv.Load() < uint64(len(want))-4096 {
		t.Fatalf("the proxy received %d bytes from its uplink", proxy.bytesRecv.Load())
	}
}

// A session that opened an image holds it like a DNBD3 client: the image
// counts a user until the session ends.
func TestISCSIImageUsers(t *testing.T) {
	base := t.TempDir()
	genImage(t, base, "img.r1", 8192, false)
	ts := startServer(t, base, "", nil)
	ic := iscsiLogin(t, ts.addr, "img:1", iscsitest.Options{})
	img := loaded(t, ts.Server, "img", 1)
	if img.Users() != 1 {
		t.Fatalf("%d users while logged in", img.Users())
	}
	if err := ic.Logout(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the image's user to go", func() bool { return img.Users() == 0 })
}

// TestISCSIThroughProxyMemoryOnly: a proxy whose copy cannot be written
// (a sync failed) answers iSCSI reads from the fetches' buffers, which
// go back to the pool while the data is still needed: the reads must see
// the copy they were given, not a reused buffer.
func TestISCSIThroughProxyMemoryOnly(t *testing.T) {
	obase := t.TempDir()
	want := genImage(t, obase, "img.r3", 5<<20+777, true)
	origin := runServer(t, obase, "", nil, nil)
	proxy := startProxy(t, "", "", "", nil, origin.addr)

	ic := iscsiLogin(t, proxy.addr, "iqn.2025-01.test:img:3", iscsitest.Options{})
	img := loaded(t, proxy.Server, "img", 3)
	failed := errors.New("test: sync failed")
	img.syncErr.Store(&failed)
	for range 2 {
		if got := readAll(t, ic); !bytes.Equal(got, want) {
			t.Fatal("data read through the proxy from memory differs")
		}
	}
	if cm := img.cache.Load(); cm == nil || cm.has(0, img.VirtualSize) {
		t.Fatal("the copy was written although its sync failed")
	}
}
