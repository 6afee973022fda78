package server

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// trySelect performs a handshake on a new connection and reports whether
// the server accepted it. An accepted connection is returned open (the
// caller closes it), a refused one is nil.
func trySelect(t *testing.T, addr, name string, rid uint16) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	p := protocol.SelectImage{Version: 3, Name: name, RID: rid}.Marshal()
	hdr := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
	if _, err := c.Write(append(hdr[:], p...)); err != nil {
		t.Fatal(err)
	}
	var rh [protocol.ReplySize]byte
	if _, err := io.ReadFull(c, rh[:]); err != nil {
		c.Close()
		return nil
	}
	r, err := protocol.ParseReply(rh[:])
	if err != nil || r.Cmd != protocol.CmdSelectImage {
		t.Fatalf("handshake reply %v %v", r, err)
	}
	body := make([]byte, r.Size)
	if _, err := io.ReadFull(c, body); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestImageTableCannotBeFilled: thousands of handshakes with aliases of
// existing images ("a//b", "a/./b", ...) and with more distinct on-demand
// names than the table holds never fill it: aliases are refused, idle
// on-demand images make room for the next, an image in use stays, and a
// real new image still loads afterwards.
func TestImageTableCannotBeFilled(t *testing.T) {
	const maxImages = 16
	const onDemand = 64
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "sub", "x.r1"), make([]byte, 4096))
	ts := startServer(t, base, fmt.Sprintf("[limits]\nmaxImages=%d\n", maxImages), nil)
	// files that appear after the scan are loaded on demand
	for i := range onDemand {
		data := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		writeFile(t, filepath.Join(base, "od", fmt.Sprintf("f%02d.r1", i)), data)
	}

	// one client keeps using od/f00 throughout
	held := trySelect(t, ts.addr, "od/f00", 1)
	if held == nil {
		t.Fatal("od/f00 refused")
	}
	defer held.Close()
	heldImg := ts.store.loaded("od/f00", 1)

	aliases := []string{"sub//x", "sub///x", "sub/./x", "sub/x/", "sub/y/../x", "./img", "od//f%02d", "od/./f%02d", "od///f%02d", "od/f%02d/"}
	accepted := 0
	for i := range 2000 {
		name := aliases[i%len(aliases)]
		if bytes.Contains([]byte(name), []byte("%")) {
			name = fmt.Sprintf(name, i%onDemand)
		}
		if c := trySelect(t, ts.addr, name, 1); c != nil {
			accepted++
			c.Close()
		}
	}
	if accepted > 0 {
		t.Errorf("%d alias handshakes accepted", accepted)
	}
	refused := 0
	for i := range 1000 {
		c := trySelect(t, ts.addr, fmt.Sprintf("od/f%02d", i%onDemand), 1)
		if c == nil {
			refused++
			continue
		}
		c.Close()
	}
	if refused > 0 {
		t.Errorf("%d of 1000 handshakes with existing on-demand names refused", refused)
	}
	for i := range 200 {
		if c := trySelect(t, ts.addr, fmt.Sprintf("od/missing%d", i), 1); c != nil {
			c.Close()
			t.Fatal("a missing image was served")
		}
	}
	if n := len(ts.store.list()); n > maxImages {
		t.Errorf("%d images loaded, maxImages=%d", n, maxImages)
	}
	for _, img := range ts.store.list() {
		if !protocol.ValidImageName(img.Name) {
			t.Errorf("non-canonical image %q in the table", img.Name)
		}
	}

	writeFile(t, filepath.Join(base, "fresh.r1"), make([]byte, 8192))
	c := trySelect(t, ts.addr, "fresh", 1)
	if c == nil {
		t.Fatal("a real new image is refused after the attempts")
	}
	c.Close()

	// the image in use was never unloaded and still serves its client
	if ts.store.loaded("od/f00", 1) != heldImg {
		t.Error("od/f00 was unloaded while a client used it")
	}
	rep, data := getBlock(t, held, 0, 4096, 0, 7)
	if rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(data, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatalf("held client read %v, data ok %v", rep, bytes.Equal(data, bytes.Repeat([]byte{1}, 4096)))
	}
}

// TestStoreEvictsOnlyIdleOnDemandImages: a full table unloads the least
// recently used idle on-demand image, never a scanned one or one in use.
func TestStoreEvictsOnlyIdleOnDemandImages(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "scan1.r1"), make([]byte, 4096))
	writeFile(t, filepath.Join(base, "scan2.r1"), make([]byte, 4096))
	s := newStore(storeOptions{BasePath: base, MaxImages: 3})
	defer s.Close()
	if _, _, _, err := s.reload(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b", "c"} {
		writeFile(t, filepath.Join(base, n+".r1"), make([]byte, 4096))
	}
	a, err := s.get("a", 1)
	if err != nil {
		t.Fatal(err)
	}
	// table full, a in use: b cannot load
	if _, err := s.get("b", 1); err == nil {
		t.Fatal("b loaded although the table is full of scanned images and one in use")
	}
	s.Release(a)
	b, err := s.get("b", 1) // a is idle now and makes room
	if err != nil {
		t.Fatalf("b: %v", err)
	}
	s.Release(b)
	if s.loaded("a", 1) != nil || s.loaded("scan1", 1) == nil || s.loaded("scan2", 1) == nil {
		t.Fatalf("wrong image unloaded: %v", s.list())
	}
	c, err := s.get("c", 1)
	if err != nil {
		t.Fatalf("c: %v", err)
	}
	s.Release(c)
	if len(s.list()) != 3 || s.loaded("b", 1) != nil {
		t.Fatalf("table %v", s.list())
	}
}

// TestProxyTableFullClosesIdleUplink: a proxy whose table is full of
// cloned images, each kept by its uplink, closes the uplink of the least
// recently used one without clients, unloads it and clones the next; the
// unloaded copy loads again from its files when asked for.
func TestProxyTableFullClosesIdleUplink(t *testing.T) {
	const maxImages = 3
	originBase := t.TempDir()
	var want [][]byte
	for i := range 2 * maxImages {
		want = append(want, genImage(t, originBase, fmt.Sprintf("p%d.r1", i), 64<<10, false))
	}
	origin := runServer(t, originBase, "", nil, nil)
	proxy := startProxy(t, "", "", fmt.Sprintf("maxPrefetch=0\nmaxImages=%d\n", maxImages), nil, origin.addr)
	read := func(i int) {
		t.Helper()
		name := fmt.Sprintf("p%d", i)
		c := trySelect(t, proxy.addr, name, 1)
		if c == nil {
			t.Fatalf("%s refused (table: %v)", name, proxy.store.list())
		}
		rep, data := getBlock(t, c, 4096, 8192, 0, 1)
		if rep.Cmd != protocol.CmdGetBlock || !bytes.Equal(data, want[i][4096:4096+8192]) {
			t.Fatalf("%s: reply %v, data ok %v", name, rep, bytes.Equal(data, want[i][4096:4096+8192]))
		}
		c.Close()
		waitFor(t, 10*time.Second, name+" without clients", func() bool {
			img := proxy.store.loaded(name, 1)
			return img == nil || img.Users() == 0
		})
	}
	for i := range 2 * maxImages {
		read(i)
		if n := len(proxy.store.list()); n > maxImages {
			t.Fatalf("%d images loaded, maxImages=%d", n, maxImages)
		}
	}
	if proxy.store.loaded("p0", 1) != nil {
		t.Fatal("p0, the least recently used, is still loaded")
	}
	read(0) // from the local copy and its .map again
}

// TestProxyLookupCacheBounded: lookups of ever new names (anyone may send
// them) do not grow the lookup cache beyond lookupCacheMax.
func TestProxyLookupCacheBounded(t *testing.T) {
	proxy := startProxy(t, "", "", "", nil) // no uplinks: every lookup fails at once
	for i := range lookupCacheMax + 2000 {
		if err := proxy.proxy.lookup(fmt.Sprintf("name%d", i), 1, false); err == nil {
			t.Fatal("lookup without uplinks succeeded")
		}
	}
	proxy.proxy.lkMu.Lock()
	n := len(proxy.proxy.lkCache)
	proxy.proxy.lkMu.Unlock()
	if n > lookupCacheMax {
		t.Fatalf("lookup cache holds %d entries, bound %d", n, lookupCacheMax)
	}
}

// TestStoreOnDemandChurn: many clients loading more distinct on-demand
// images than the table holds never see an image they just loaded
// unloaded under them ("not found"); the only refusal is a table full of
// images in use.
func TestStoreOnDemandChurn(t *testing.T) {
	base := t.TempDir()
	s := newStore(storeOptions{BasePath: base, MaxImages: 4})
	defer s.Close()
	const names = 16
	old := time.Now().Add(-time.Hour)
	for i := range names {
		p := filepath.Join(base, fmt.Sprintf("n%d.r1", i))
		writeFile(t, p, make([]byte, 4096))
		os.Chtimes(p, old, old) // an old file must not look least recently used once loaded
	}
	errs := make(chan error, 8)
	for g := range 8 {
		go func() {
			var bad error
			for i := range 300 {
				img, err := s.get(fmt.Sprintf("n%d", (g*7+i)%names), 1)
				if err != nil {
					if !errors.Is(err, errTooManyImages) && bad == nil {
						bad = err
					}
					continue
				}
				if img.Users() < 1 {
					bad = fmt.Errorf("%s returned without a client reference", img)
				}
				s.Release(img)
			}
			errs <- bad
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := len(s.list()); n > 4 {
		t.Errorf("%d images loaded, maxImages=4", n)
	}
}
