package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// openImage opens name/rid on addr with the client library and reads its
// first n bytes.
func openImage(t *testing.T, addr, name string, rid uint16, n int) *client.Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ci, err := client.Open(ctx, client.Config{Servers: []string{addr}, Image: name, RID: rid, NoProbe: true, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ci.Close() })
	if n > 0 {
		if _, err := ci.ReadAt(make([]byte, n), 0); err != nil {
			t.Fatal(err)
		}
	}
	return ci
}

// TestStatusPageInChromium loads the status pages of a server and of a
// proxy that replicates an image through a slow uplink: the tables show
// the images, clients and alt servers, the proxy's cache map picture
// changes as blocks arrive, the console stays clean, and both pages are
// saved as screenshots.
func TestStatusPageInChromium(t *testing.T) {
	b := newBrowser(t)
	base := t.TempDir()
	os.MkdirAll(filepath.Join(base, "lab"), 0o755)
	os.MkdirAll(filepath.Join(base, "tools"), 0o755)
	testutil.WriteGenImage(t, filepath.Join(base, "lab", "ubuntu-24.04.r1"), 48<<20)
	testutil.WriteGenImage(t, filepath.Join(base, "lab", "win11.r2"), 16<<20)
	testutil.WriteGenImage(t, filepath.Join(base, "tools", "memtest.r1"), 1<<20)
	testutil.WriteGenImage(t, filepath.Join(base, "rescue.r5"), 4<<20)
	up := startServerConf(t, "[dnbd3]\nbasePath="+base+"\n", map[string]string{})
	slow := startThrottle(t, up.addr, 4<<20) // 48 MiB take about 12 s
	proxy := startServerConf(t, "[dnbd3]\nbasePath="+t.TempDir()+"\nisProxy=true\nbackgroundReplication=true\n"+
		"autoFreeDiskSpaceDelay=-1\n[limits]\nmaxPrefetch=0\n",
		map[string]string{"alt-servers": "[" + slow.addr() + "]\ncomment=upstream (throttled)\n"})
	openImage(t, up.addr, "lab/win11", 2, 4<<20)
	openImage(t, up.addr, "rescue", 5, 1<<20)
	openImage(t, proxy.addr, "lab/ubuntu-24.04", 1, 1<<20)

	// the proxy while it replicates
	mapSel := `document.querySelector('canvas.cachemap[data-image="lab/ubuntu-24.04"]')`
	b.do(t, "open the proxy's page", chromedp.Navigate("http://"+proxy.addr+"/"))
	b.waitJS(t, "the cache map", mapSel+` && `+mapSel+`.dataset.present !== undefined`, 20*time.Second)
	first, firstPNG := b.eval(t, mapSel+`.dataset.present`), b.eval(t, mapSel+`.toDataURL()`)
	b.waitJS(t, "the cache map to fill further", mapSel+` && `+mapSel+`.dataset.present !== "`+first+`"`, 20*time.Second)
	if b.eval(t, mapSel+`.toDataURL()`) == firstPNG {
		t.Error("the cache map picture did not change while blocks arrived")
	}
	images := b.text(t, "#images tbody")
	if !strings.Contains(images, "lab/ubuntu-24.04") || !strings.Contains(images, "48.0 MiB") || !strings.Contains(images, slow.addr()) {
		t.Errorf("proxy image table: %q", images)
	}
	if clients := b.text(t, "#clients tbody"); !strings.Contains(clients, "127.0.0.1") || !strings.Contains(clients, "lab/ubuntu-24.04:1") {
		t.Errorf("proxy client table: %q", clients)
	}
	if alts := b.text(t, "#alts tbody"); !strings.Contains(alts, slow.addr()) || !strings.Contains(alts, "upstream (throttled)") {
		t.Errorf("alt server table: %q", alts)
	}
	// a few refreshes draw the RTT history before the screenshot
	b.waitJS(t, "three refreshes", `Number(document.body.dataset.polls) >= 3`, 20*time.Second)
	b.screenshot(t, "server-status-proxy")

	// the upstream server
	b.do(t, "open the server's page", chromedp.Navigate("http://"+up.addr+"/"))
	b.waitJS(t, "four images", `document.querySelectorAll('#images tbody tr[data-image]').length === 4`, 20*time.Second)
	rows := b.eval(t, `[...document.querySelectorAll('#images tbody tr[data-image]')].map(r => r.dataset.image + ":" + r.dataset.rid).join(" ")`)
	if rows != "lab/ubuntu-24.04:1 lab/win11:2 rescue:5 tools/memtest:1" {
		t.Errorf("image rows %q", rows)
	}
	b.waitJS(t, "three clients", `document.querySelectorAll('#clients tbody tr').length === 3`, 20*time.Second)
	if kinds := b.text(t, "#clients tbody"); !strings.Contains(kinds, "proxy") || !strings.Contains(kinds, "lab/win11:2") {
		t.Errorf("client table: %q", kinds)
	}
	if vis := b.eval(t, `String(!document.getElementById('altNone').hidden)`); vis != "true" {
		t.Error("a server without alt-servers does not say so")
	}
	if n := b.eval(t, `String(document.querySelectorAll('canvas.cachemap').length)`); n != "0" {
		t.Errorf("complete images drew %s cache maps", n)
	}
	b.screenshot(t, "server-status")
	b.checkConsole(t)
}
