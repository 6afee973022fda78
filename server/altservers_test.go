package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// altNoResolve is a resolver for tests: only "origin.test" resolves.
func altNoResolve(_ context.Context, host string) (netip.Addr, error) {
	if host == "origin.test" {
		return netip.MustParseAddr("192.0.2.7"), nil
	}
	return netip.Addr{}, errors.New("no such host")
}

func altLoad(t *testing.T, text string) ([]*altServer, []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), altServersFileName)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	list, warns, err := loadAltServers(path)
	if err != nil {
		t.Fatal(err)
	}
	return list, warns
}

// altDesc summarises an entry for comparisons.
func altDesc(a *altServer) string {
	return fmt.Sprintf("%s private=%v client=%v ns=%q comment=%q", formatHost(a.Addr), a.Private, a.ClientOnly, a.Namespaces, a.Comment)
}

func altDescs(list []*altServer) []string {
	out := make([]string, len(list))
	for i, a := range list {
		out[i] = altDesc(a)
	}
	return out
}

func TestAltServersINI(t *testing.T) {
	list, warns := altLoad(t, `# origin of the captured GET_SERVERS reply
[127.0.0.2:5003]
comment=first alt server

[[::1]:5004]
comment=ipv6 loopback

[10.0.0.1]
[10.0.0.2]
for=client-only please
[10.0.0.3:5005]
for=replication
namespace=pool/
namespace = lab/
[2001:db8::1]
comment=bare v6
[[2001:db8::2]]
for:client
[127.0.0.2]
namespace=merged/
`)
	if len(warns) != 0 {
		t.Errorf("unexpected warnings %q", warns)
	}
	want := []string{
		`127.0.0.2:5003 private=false client=false ns=["merged/"] comment="first alt server"`,
		`[::1]:5004 private=false client=false ns=[] comment="ipv6 loopback"`,
		`10.0.0.2:5003 private=false client=true ns=[] comment=""`,
		`10.0.0.3:5005 private=true client=false ns=["pool/" "lab/"] comment=""`,
		`[2001:db8::1]:5003 private=false client=false ns=[] comment="bare v6"`,
		`[2001:db8::2]:5003 private=false client=true ns=[] comment=""`,
	}
	if got := altDescs(list); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestAltServersINIWarnings(t *testing.T) {
	p := &altParser{resolve: altNoResolve}
	p.parseINIFormat([]byte("[origin.test:5010]\ncomment=by name\n[nowhere.test]\ncomment=x\ncomment=y\n[1.2.3.4:0]\ncomment=bad port\n[::1]:x]\nk=v\n[5.6.7.8]\nfor=everyone\nbogus=1\ncomment=" + strings.Repeat("é", 100) + "\n"))
	got := altDescs(p.list)
	want := []string{
		`192.0.2.7:5010 private=false client=false ns=[] comment="by name"`,
		`5.6.7.8:5003 private=false client=false ns=[] comment="` + strings.Repeat("é", 59) + `"`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(p.list) == 2 && len(p.list[1].Comment) != 118 {
		t.Errorf("comment cut to %d bytes, want 118 (119 would split a rune)", len(p.list[1].Comment))
	}
	joined := strings.Join(lineWarnings("", p.probs), "\n")
	for _, w := range []string{"cannot resolve nowhere.test", "invalid port", "for=everyone", `unknown key "bogus"`, "[::1]:x"} {
		if !strings.Contains(joined, w) {
			t.Errorf("warnings lack %q:\n%s", w, joined)
		}
	}
	if n := strings.Count(joined, "invalid host section [nowhere.test]"); n != 1 {
		t.Errorf("bad section warned %d times, want once", n)
	}
}

func TestAltServersLegacy(t *testing.T) {
	list, warns := altLoad(t, `# legacy format
-127.0.0.1:15102 upstream via tap (private)
+127.0.0.1:15009 client-only entry
  # indented comment

10.1.2.3   plain   entry  
2001:db8::5 bare v6
not/a/host something
[::1]:5007 v6 with port
`)
	want := []string{
		`127.0.0.1:15102 private=true client=false ns=[] comment="upstream via tap (private)"`,
		`127.0.0.1:15009 private=false client=true ns=[] comment="client-only entry"`,
		`10.1.2.3:5003 private=false client=false ns=[] comment="plain   entry"`,
		`[2001:db8::5]:5003 private=false client=false ns=[] comment="bare v6"`,
		`[::1]:5007 private=false client=false ns=[] comment="v6 with port"`,
	}
	if got := altDescs(list); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Only the legacy pass's complaint remains (the INI attempt's noise is dropped).
	if len(warns) != 1 || !strings.Contains(warns[0], "not/a/host") || !strings.Contains(warns[0], "line 8") {
		t.Errorf("warnings %q", warns)
	}
	// The RPC shows these like the reference's q=altservers capture.
	if formatHost(list[0].Addr) != "127.0.0.1:15102" || formatHost(list[4].Addr) != "[::1]:5007" {
		t.Error("FormatHost")
	}
	if got := formatHost(netip.MustParseAddrPort("[::ffff:127.0.0.1]:15306")); got != "127.0.0.1:15306" {
		t.Errorf("FormatHost(mapped) = %s", got)
	}
}

func TestAltServersMissingAndEmpty(t *testing.T) {
	list, warns, err := loadAltServers(filepath.Join(t.TempDir(), "alt-servers"))
	if err != nil || list != nil || warns != nil {
		t.Errorf("missing file: %v %v %v", list, warns, err)
	}
	list, warns = altLoad(t, "# nothing\n\n[1.2.3.4]\n[5.6.7.8]\ncomment=has a key\n[9.9.9.9]\n")
	if got := altDescs(list); len(got) != 1 || !strings.HasPrefix(got[0], "5.6.7.8:5003 ") || len(warns) != 0 {
		t.Errorf("sections without keys: %v %q", got, warns)
	}
	// Only key-less sections: nothing, and not read as legacy lines either.
	list, warns = altLoad(t, "[1.2.3.4]\n[5.6.7.8]\n")
	if len(list) != 0 || len(warns) != 0 {
		t.Errorf("only key-less sections: %v %q", altDescs(list), warns)
	}
	if _, _, err := loadAltServers(t.TempDir()); err == nil {
		t.Error("reading a directory should fail")
	}
}

func TestAltServersCap(t *testing.T) {
	var ini, legacy strings.Builder
	for i := range 60 {
		fmt.Fprintf(&ini, "[10.0.%d.1]\ncomment=n%d\n", i, i)
		fmt.Fprintf(&legacy, "10.0.%d.1 n%d\n", i, i)
	}
	for _, text := range []string{ini.String(), legacy.String()} {
		list, warns := altLoad(t, text)
		if len(list) != maxAltServers {
			t.Fatalf("got %d entries, want %d", len(list), maxAltServers)
		}
		if list[49].Comment != "n49" || list[49].Addr != netip.MustParseAddrPort("10.0.49.1:5003") {
			t.Errorf("last entry %s", altDesc(list[49]))
		}
		if len(warns) != 1 || !strings.Contains(warns[0], "more than 50") {
			t.Errorf("warnings %q", warns)
		}
	}
}

func TestAltServersRuntime(t *testing.T) {
	a := &altServer{Addr: netip.MustParseAddrPort("127.0.0.1:15102")}
	if a.avgRTT() != 0 {
		t.Error("AvgRTT without samples")
	}
	a.recordRTT(3011)
	if s := a.snapshot(); s.RTT != [5]uint32{0, 0, 0, 0, 3011} || s.Fails != 0 {
		t.Errorf("snapshot %+v", s)
	}
	for _, v := range []uint32{1, 2, 3, 4, 5} {
		a.recordRTT(v)
	}
	if s := a.snapshot(); s.RTT != [5]uint32{1, 2, 3, 4, 5} {
		t.Errorf("history %v", s.RTT)
	}
	if a.avgRTT().Microseconds() != 3 {
		t.Errorf("AvgRTT %v", a.avgRTT())
	}
	if a.recordFailure() != 1 || a.recordFailure() != 2 || a.snapshot().Fails != 2 {
		t.Error("failure count")
	}
	a.recordSuccess()
	if a.snapshot().Fails != 0 {
		t.Error("success does not reset")
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				a.recordRTT(uint32(i))
				a.recordFailure()
				_ = a.snapshot()
			}
		}()
	}
	wg.Wait()
	if a.snapshot().Fails != 400 {
		t.Errorf("concurrent failures %d", a.snapshot().Fails)
	}
}

func altMk(addr string, mod func(*altServer)) *altServer {
	a := &altServer{Addr: netip.MustParseAddrPort(addr)}
	if mod != nil {
		mod(a)
	}
	return a
}

func entryAddrs(es []protocol.ServerEntry) string {
	var s []string
	for _, e := range es {
		s = append(s, formatHost(e.Addr))
	}
	return strings.Join(s, " ")
}

func TestSelectForClientCaptured(t *testing.T) {
	list, _ := altLoad(t, "[127.0.0.2:5003]\ncomment=a\n[[::1]:5004]\ncomment=b\n")
	self := netip.MustParseAddrPort("127.0.0.1:5003")
	got := protocol.MarshalServerList(selectForClient(list, netip.MustParseAddr("127.0.0.1"), "test", self))
	const want = "7f000002000000000000000000000000138b020000000000000000000000000000000001138c0a00"
	if hex.EncodeToString(got) != want {
		t.Errorf("payload %x\nwant    %s", got, want)
	}
	// And it is exactly what the reference sent in the capture.
	for _, m := range testutil.ReadWire(t, "get_servers.txt") {
		if !m.FromClient {
			if payload := m.Bytes[protocol.ReplySize:]; string(payload) != string(got) {
				t.Errorf("capture line %d payload %x, ours %x", m.Line, payload, got)
			}
		}
	}
	// An IPv4-mapped client address gives the same answer.
	got2 := protocol.MarshalServerList(selectForClient(list, netip.MustParseAddr("::ffff:127.0.0.1"), "test", self))
	if string(got2) != string(got) {
		t.Errorf("mapped client: %x", got2)
	}
}

func TestSelectForClientOrder(t *testing.T) {
	list := []*altServer{
		altMk("192.168.7.1:5003", nil),
		altMk("[2001:db8:1::1]:5003", nil),
		altMk("10.1.2.3:5003", nil),
		altMk("10.1.200.3:5003", nil),
		altMk("[2001:db8:ffff::1]:5003", nil),
		altMk("10.1.2.4:5003", func(a *altServer) { a.Private = true }),
		altMk("10.1.2.5:5003", func(a *altServer) { a.ClientOnly = true }),
		altMk("10.9.9.9:5003", nil),
		altMk("10.1.2.6:5003", func(a *altServer) { a.Namespaces = []string{"lab/"} }),
		altMk("10.1.2.1:5003", nil), // self
	}
	self := netip.MustParseAddrPort("[::ffff:10.1.2.1]:5003")

	got := entryAddrs(selectForClient(list, netip.MustParseAddr("10.1.2.99"), "pool/img", self))
	want := "10.1.2.3:5003 10.1.2.5:5003 10.1.200.3:5003 10.9.9.9:5003 192.168.7.1:5003 [2001:db8:1::1]:5003 [2001:db8:ffff::1]:5003"
	if got != want {
		t.Errorf("v4 client:\n got %s\nwant %s", got, want)
	}
	got = entryAddrs(selectForClient(list, netip.MustParseAddr("10.1.2.99"), "lab/img", self))
	want = "10.1.2.3:5003 10.1.2.5:5003 10.1.2.6:5003 10.1.200.3:5003 10.9.9.9:5003 192.168.7.1:5003 [2001:db8:1::1]:5003 [2001:db8:ffff::1]:5003"
	if got != want {
		t.Errorf("namespace:\n got %s\nwant %s", got, want)
	}
	got = entryAddrs(selectForClient(list, netip.MustParseAddr("2001:db8:ffff::77"), "pool/img", self))
	want = "[2001:db8:ffff::1]:5003 [2001:db8:1::1]:5003 192.168.7.1:5003 10.1.2.3:5003 10.1.200.3:5003 10.1.2.5:5003 10.9.9.9:5003"
	if got != want {
		t.Errorf("v6 client:\n got %s\nwant %s", got, want)
	}
	// Same address, other port: not self.
	got = entryAddrs(selectForClient(list[9:], netip.MustParseAddr("10.1.2.99"), "x", netip.MustParseAddrPort("10.1.2.1:5004")))
	if got != "10.1.2.1:5003" {
		t.Errorf("other port treated as self: %q", got)
	}

	var many []*altServer
	for i := range 20 {
		many = append(many, altMk(fmt.Sprintf("172.16.%d.1:5003", i), nil))
	}
	many = append(many, altMk("10.0.0.1:5003", nil))
	sel := selectForClient(many, netip.MustParseAddr("10.0.0.2"), "x", netip.AddrPort{})
	if len(sel) != protocol.NumberServers || formatHost(sel[0].Addr) != "10.0.0.1:5003" || formatHost(sel[7].Addr) != "172.16.6.1:5003" {
		t.Errorf("cap: %s", entryAddrs(sel))
	}
}

func TestAddrCloseness(t *testing.T) {
	cases := []struct {
		a, b string
		n    int
	}{
		{"10.1.2.3", "10.1.2.3", 8},
		{"10.1.2.3", "10.1.2.4", 7},
		{"10.1.2.3", "10.1.2.19", 6},
		{"10.1.2.3", "11.1.2.3", 1},
		{"10.1.2.3", "138.1.2.3", 0},
		{"::ffff:10.1.2.3", "10.1.2.3", 8},
		{"10.1.2.3", "::a01:203", 0},
		{"2001:db8::1", "2001:db8::1", 32},
		{"2001:db8::1", "2001:db9::1", 7},
	}
	for _, c := range cases {
		if got := addrCloseness(netip.MustParseAddr(c.a), netip.MustParseAddr(c.b)); got != c.n {
			t.Errorf("closeness(%s, %s) = %d, want %d", c.a, c.b, got, c.n)
		}
	}
}

func TestUplinks(t *testing.T) {
	list := []*altServer{
		altMk("10.0.0.1:5003", nil),
		altMk("10.0.0.2:5003", func(a *altServer) { a.Private = true }),
		altMk("10.0.0.3:5003", func(a *altServer) { a.ClientOnly = true }),
		altMk("10.0.0.4:5003", func(a *altServer) { a.Private = true; a.Namespaces = []string{"lab/"} }),
	}
	str := func(l []*altServer) string {
		var s []string
		for _, a := range l {
			s = append(s, formatHost(a.Addr))
		}
		return strings.Join(s, " ")
	}
	if got := str(uplinks(list, false, "pool/x")); got != "10.0.0.1:5003 10.0.0.2:5003" {
		t.Errorf("all: %s", got)
	}
	if got := str(uplinks(list, false, "lab/x")); got != "10.0.0.1:5003 10.0.0.2:5003 10.0.0.4:5003" {
		t.Errorf("namespace: %s", got)
	}
	if got := str(uplinks(list, true, "lab/x")); got != "10.0.0.2:5003 10.0.0.4:5003" {
		t.Errorf("private only: %s", got)
	}
}

func FuzzAltServers(f *testing.F) {
	f.Add([]byte("[127.0.0.2:5003]\ncomment=x\n[[::1]:5004]\nfor=client\nnamespace=a/\n"))
	f.Add([]byte("-127.0.0.1:15102 upstream via tap (private)\n+127.0.0.1:15009 client-only entry\n"))
	f.Add([]byte("[origin.test]\nfor=replication\n2001:db8::1 x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		list, _ := parseAltServers(data, altNoResolve)
		if len(list) > maxAltServers {
			t.Fatalf("%d entries", len(list))
		}
		seen := map[netip.AddrPort]bool{}
		for _, a := range list {
			if !a.Addr.IsValid() || a.Addr.Port() == 0 || a.Addr.Addr().Is4In6() {
				t.Fatalf("bad address %v", a.Addr)
			}
			if seen[a.Addr] {
				t.Fatalf("duplicate %v", a.Addr)
			}
			seen[a.Addr] = true
			if len(a.Comment) > maxAltComment {
				t.Fatalf("comment of %d bytes", len(a.Comment))
			}
			if a.Private && a.ClientOnly {
				t.Fatalf("private and client-only")
			}
		}
		sel := selectForClient(list, netip.MustParseAddr("127.0.0.1"), "img", netip.AddrPort{})
		if len(sel) > protocol.NumberServers {
			t.Fatalf("%d selected", len(sel))
		}
	})
}
