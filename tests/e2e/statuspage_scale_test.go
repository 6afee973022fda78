package e2e

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// rawClient performs a DNBD3 handshake for name/rid on addr and keeps the
// connection open until the test ends.
func rawClient(t *testing.T, addr, name string, rid uint16) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p := protocol.SelectImage{Version: 3, Name: name, RID: rid}.Marshal()
	hdr := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
	if _, err := c.Write(append(hdr[:], p...)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var rep [protocol.ReplySize]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatalf("handshake %s: %v", name, err)
	}
	r, _ := protocol.ParseReply(rep[:])
	if _, err := io.CopyN(io.Discard, c, int64(r.Size)); err != nil {
		t.Fatal(err)
	}
}

// TestStatusPageManyImagesAndClients: with 500 images and 4,000 clients (maxClients; the page is served from the RPC reserve)
// the page shows one page of each (50 images, 100 clients), pages forward
// and filters on the server, and stays free of console errors.
func TestStatusPageManyImagesAndClients(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Max < 4500 {
		t.Skipf("SKIP: 4,000 client connections need a descriptor limit of at least 4500 (hard limit %d, %v)", lim.Max, err)
	}
	b := newBrowser(t)
	base := t.TempDir()
	for i := range 500 {
		if err := os.WriteFile(filepath.Join(base, fmt.Sprintf("pool-%03d.r1", i)), make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d := startServerConf(t, "[dnbd3]\nbasePath="+base+"\n", map[string]string{})
	for i := range 4000 {
		rawClient(t, d.addr, fmt.Sprintf("pool-%03d", i%500), 1)
	}
	b.do(t, "open the page", chromedp.Navigate("http://"+d.addr+"/"))
	b.waitJS(t, "the first page of images", `document.querySelectorAll('#images tbody tr[data-image]').length === 50`, 20*time.Second)
	if p := b.text(t, "#imagesPager"); !strings.Contains(p, "1–50 of 500") {
		t.Errorf("image pager %q", p)
	}
	b.waitJS(t, "the first page of clients", `document.querySelectorAll('#clients tbody tr').length === 100`, 20*time.Second)
	if p := b.text(t, "#clientsPager"); !strings.Contains(p, "1–100 of 4000") {
		t.Errorf("client pager %q", p)
	}
	if n := b.text(t, "#clientCount"); n != "4000" {
		t.Errorf("client count %q", n)
	}
	b.eval(t, `(document.querySelector('#imagesPager button:last-child').click(), "")`)
	b.waitJS(t, "the second page", `(document.querySelector('#images tbody tr[data-image]') || {dataset: {}}).dataset.image === "pool-050"`, 20*time.Second)
	b.eval(t, `(() => { const f = document.getElementById('imageFilter'); f.value = "pool-49"; f.dispatchEvent(new Event('input')); return ""; })()`)
	b.waitJS(t, "the filtered list", `document.querySelectorAll('#images tbody tr[data-image]').length === 10`, 20*time.Second)
	b.checkConsole(t)
}
