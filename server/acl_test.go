package server

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func aclLoad(t *testing.T, text string) (*ACL, []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), aclFileName)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	acl, warns, err := loadACL(path)
	if err != nil {
		t.Fatal(err)
	}
	return acl, warns
}

func aclAllowed(a *ACL, ip string) aclPerm { return a.allowed(netip.MustParseAddr(ip)) }

func TestACLSpecExample(t *testing.T) {
	acl, warns := aclLoad(t, "127.0.0.0/8 STATS IMAGE_LIST\n")
	if len(warns) != 0 || acl.Len() != 1 {
		t.Fatalf("warnings %q, %d rules", warns, acl.Len())
	}
	p := aclAllowed(acl, "127.0.0.1")
	if !p.has(permStats) || !p.has(permImageList) || p.has(permClientList) || p.has(permAll) {
		t.Errorf("127.0.0.1 got %s", p)
	}
	if p != permStats|permImageList || p.String() != "STATS IMAGE_LIST" {
		t.Errorf("127.0.0.1 perm %#x %q", uint8(p), p)
	}
	if p := aclAllowed(acl, "10.0.0.1"); p != 0 || p.has(permStats) || p.String() != "" {
		t.Errorf("10.0.0.1 got %s", p)
	}
	if p := aclAllowed(acl, "::ffff:127.0.0.5"); p != permStats|permImageList {
		t.Errorf("mapped loopback got %s", p)
	}
	// No IPv6 rule: ::1 gets nothing, even though ::1 and 127.x start with
	// different bytes anyway; 7f00::1 shares the first byte with 127/8.
	if p := aclAllowed(acl, "::1"); p != 0 {
		t.Errorf("::1 got %s", p)
	}
	if p := aclAllowed(acl, "7f00::1"); p != 0 {
		t.Errorf("7f00::1 matched an IPv4 rule: %s", p)
	}
}

func TestACLRules(t *testing.T) {
	acl, warns := aclLoad(t, `# RPC access
   # indented comment

10.0.0.5        ALL            # admin box
10.0.0.0/24     STATS
10.0.0.0/8      CLIENT_LIST IMAGE_LIST STATS
2001:db8::/32   IMAGE_LIST BOGUS
::1             STATS CLIENT_LIST IMAGE_LIST
::ffff:192.168.0.0/112 STATS
192.168.9.9/33  ALL
nonsense        ALL
172.16.0.1      WHATEVER
172.16.0.0/12   # only a comment
172.16.0.2      STATS#IMAGE_LIST
`)
	if acl.Len() != 7 {
		t.Errorf("%d rules, want 7", acl.Len())
	}
	cases := map[string]aclPerm{
		"10.0.0.5":           permAll,
		"10.0.0.6":           permStats, // first match wins
		"10.1.0.1":           permStats | permClientList | permImageList,
		"::ffff:10.1.0.1":    permStats | permClientList | permImageList,
		"2001:db8:1::9":      permImageList,
		"2001:db9::9":        0,
		"::1":                permStats | permClientList | permImageList,
		"192.168.4.4":        permStats,
		"::ffff:192.168.4.4": permStats,
		"192.169.0.1":        0,
		"172.16.0.1":         0,
		"172.16.0.2":         permStats,
		"fe80::1%eth0":       0,
	}
	for ip, want := range cases {
		if got := aclAllowed(acl, ip); got != want {
			t.Errorf("%s: got %q, want %q", ip, got, want)
		}
	}
	all := permStats | permClientList | permImageList
	if all.has(permAll) || !permAll.has(all) || !permAll.has(permAll) {
		t.Error("ALL is more than the three list flags")
	}
	joined := strings.Join(warns, "\n")
	for _, w := range []string{"line 7: unknown flag(s) BOGUS", "line 10: invalid prefix length \"33\"", "line 11: invalid address \"nonsense\"",
		"line 12: unknown flag(s) WHATEVER", "line 12: ", "no valid flag", "line 13: rule for 172.16.0.0/12 has no valid flag"} {
		if !strings.Contains(joined, w) {
			t.Errorf("warnings lack %q:\n%s", w, joined)
		}
	}
	if !strings.Contains(joined, aclFileName+": line") {
		t.Errorf("warnings should name the file: %q", warns)
	}
}

func TestACLAllowAll(t *testing.T) {
	acl, warns, err := loadACL(filepath.Join(t.TempDir(), "rpc.acl"))
	if err != nil || len(warns) != 0 {
		t.Fatal(err, warns)
	}
	for _, ip := range []string{"127.0.0.1", "10.0.0.1", "::1"} {
		if p := aclAllowed(acl, ip); p != permAll {
			t.Errorf("no file: %s got %s", ip, p)
		}
	}
	acl, _ = aclLoad(t, "# only comments\n\n   # more\n")
	if p := aclAllowed(acl, "203.0.113.9"); p != permAll {
		t.Errorf("comment-only file: got %s", p)
	}
	acl, warns = aclLoad(t, "1.2.3.4 NOTHING\n")
	if p := aclAllowed(acl, "203.0.113.9"); p != permAll || len(warns) == 0 {
		t.Errorf("file without valid rule: got %s, warnings %q", p, warns)
	}
	var nilACL *ACL
	if nilACL.allowed(netip.MustParseAddr("1.1.1.1")) != permAll || nilACL.Len() != 0 {
		t.Error("nil ACL should allow all")
	}
	if _, _, err := loadACL(t.TempDir()); err == nil {
		t.Error("reading a directory should fail")
	}
}

func TestACLCap(t *testing.T) {
	var b strings.Builder
	for i := range 120 {
		fmt.Fprintf(&b, "10.0.0.%d STATS\n", i)
	}
	acl, warns := aclLoad(t, b.String())
	if acl.Len() != maxACLRules {
		t.Errorf("%d rules, want %d", acl.Len(), maxACLRules)
	}
	if aclAllowed(acl, "10.0.0.99") != permStats || aclAllowed(acl, "10.0.0.100") != 0 {
		t.Error("rule 100 missing or rule 101 present")
	}
	if len(warns) != 1 || !strings.Contains(warns[0], "more than 100") {
		t.Errorf("warnings %q", warns)
	}
}

func FuzzACL(f *testing.F) {
	f.Add([]byte("127.0.0.0/8 STATS IMAGE_LIST\n"))
	f.Add([]byte("# c\n::1/128 ALL # x\n10.0.0.0/33 STATS\n::ffff:1.2.3.4/120 CLIENT_LIST\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		acl, _ := parseACL(data)
		if acl.Len() > maxACLRules {
			t.Fatalf("%d rules", acl.Len())
		}
		for _, r := range acl.rules {
			if !r.prefix.IsValid() || r.perm == 0 || r.prefix.Addr().Is4In6() {
				t.Fatalf("bad rule %+v", r)
			}
		}
		for _, ip := range []string{"127.0.0.1", "::1", "::ffff:10.0.0.1"} {
			p := acl.allowed(netip.MustParseAddr(ip))
			if acl.Len() == 0 && p != permAll {
				t.Fatalf("no rules but %s got %s", ip, p)
			}
		}
	})
}

// TestACLOpenByMistake: an rpc.acl whose rule lines all fail to parse
// would leave the RPC open to everyone (the reference's behaviour), so the
// server does not start, unless AllowOpenRPC (--allow-open-rpc) says it is
// deliberate: then it starts open and warns. An absent, empty or
// comment-only file is silent.
func TestACLOpenByMistake(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	for _, tc := range []struct {
		name      string
		acl       *string
		mistake   bool
		allowOpen bool
	}{
		{"absent", nil, false, false},
		{"empty", ptr(""), false, false},
		{"comments", ptr("# nothing yet\n\n   # really\n"), false, false},
		{"all invalid", ptr("10.0.0.300 ALL\n127.0.0.1 EVERYTHING\nnonsense\n"), true, false},
		{"all invalid, allowed", ptr("10.0.0.300 ALL\n127.0.0.1 EVERYTHING\nnonsense\n"), true, true},
		{"one valid", ptr("nonsense\n10.0.0.0/8 STATS\n"), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string]string{}
			if tc.acl != nil {
				files[aclFileName] = *tc.acl
			}
			dir, cfg := writeConfigDir(t, base, "", files)
			log, lc := captureLogger(t)
			srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: log, AllowOpenRPC: tc.allowOpen})
			if tc.mistake && !tc.allowOpen {
				if err == nil || !strings.Contains(err.Error(), "open to everyone") || !strings.Contains(err.Error(), "--allow-open-rpc") ||
					!strings.Contains(err.Error(), aclFileName) {
					t.Fatalf("New = %v, want an error naming rpc.acl and --allow-open-rpc", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer srv.store.Close()
			warned := strings.Contains(lc.String(), "level=WARN") && strings.Contains(lc.String(), "RPC is open to everyone")
			if warned != tc.mistake {
				t.Errorf("open RPC warned: %v, want %v; log:\n%s", warned, tc.mistake, lc.String())
			}
			if srv.acl.openByMistake() != tc.mistake {
				t.Errorf("OpenByMistake() = %v", srv.acl.openByMistake())
			}
			if tc.mistake && srv.acl.allowed(netip.MustParseAddr("192.0.2.1")) != permAll {
				t.Error("allowed on purpose, but the RPC is not open (the reference's behaviour)")
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
