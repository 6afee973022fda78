package server

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
)

type iniLine struct {
	section, key, value string
	line                int
}

func collectINI(t *testing.T, text string) ([]iniLine, error) {
	t.Helper()
	var got []iniLine
	err := parseINI(strings.NewReader(text), func(s, k, v string, n int) {
		got = append(got, iniLine{s, k, v, n})
	})
	return got, err
}

func TestINIParse(t *testing.T) {
	text := "\xEF\xBB\xBFtop=level\n" +
		"; comment\n" +
		"# another comment\n" +
		"[dnbd3]\n" +
		"basePath=/srv/dnbd3/   \n" +
		"  listenPort : 5003  \r\n" +
		"url=http://x:1/a=b\n" +
		"serverPenalty=100000 ; inline comment\n" +
		"clientPenalty=5;not a comment\n" +
		"empty=\n" +
		"semi= ;value starting with semicolon\n" +
		"tabbed\t=\tv\t;\tc\n" +
		"\n" +
		"[[2001:db8::1]:5003] ; v6 section\n" +
		"comment=ipv6 box\n" +
		"[ spaced ]\n" +
		"k=v\n"
	got, err := collectINI(t, text)
	if err != nil {
		t.Fatalf("parseINI: %v", err)
	}
	want := []iniLine{
		{"", "top", "level", 1},
		{"dnbd3", "basePath", "/srv/dnbd3/", 5},
		{"dnbd3", "listenPort", "5003", 6},
		{"dnbd3", "url", "http://x:1/a=b", 7},
		{"dnbd3", "serverPenalty", "100000", 8},
		{"dnbd3", "clientPenalty", "5;not a comment", 9},
		{"dnbd3", "empty", "", 10},
		{"dnbd3", "semi", ";value starting with semicolon", 11},
		{"dnbd3", "tabbed", "v", 12},
		{"[2001:db8::1]:5003", "comment", "ipv6 box", 15},
		{" spaced ", "k", "v", 17},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("parseINI got\n%+v\nwant\n%+v", got, want)
	}
}

func TestINISyntaxErrors(t *testing.T) {
	got, err := collectINI(t, "[a]\nnovalue\nk=v\n[broken\nk2=v2\nbad ;x=y\n")
	var se *iniSyntaxError
	if !errors.As(err, &se) || se.Line != 2 {
		t.Fatalf("error = %v, want syntax error at line 2", err)
	}
	// Good lines are still delivered; a broken section header keeps the
	// previous section; `bad ;x=y` has its = inside a comment.
	want := []iniLine{{"a", "k", "v", 3}, {"a", "k2", "v2", 5}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	// CRLF; a BOM is only skipped on line 1 (later it is part of the key).
	got, err = collectINI(t, "[s]\r\nx=1\r\n\xEF\xBB\xBFy=2")
	want = []iniLine{{"s", "x", "1", 2}, {"s", "\xEF\xBB\xBFy", "2", 3}}
	if err != nil || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %+v, %v; want %+v", got, err, want)
	}
	got, _ = collectINI(t, "[s]\nlast=1")
	if len(got) != 1 || got[0].value != "1" {
		t.Errorf("last line without newline: %+v", got)
	}
}

func TestParseNumber(t *testing.T) {
	ok := map[string]int64{
		"0":                    0,
		"42":                   42,
		"+7":                   7,
		"-1":                   -1,
		" 12 ":                 12,
		"1k":                   1024,
		"1K":                   1024,
		"1KB":                  1000,
		"1kb":                  1000,
		"1Kb":                  1000,
		"9m":                   540,
		"9M":                   9437184,
		"9MB":                  9000000,
		"9Mb":                  9000000,
		"2G":                   2 << 30,
		"2g":                   2 << 30,
		"3GB":                  3000000000,
		"1T":                   1 << 40,
		"1t":                   1 << 40,
		"1TB":                  1000000000000,
		"1P":                   1 << 50,
		"1p":                   1 << 50,
		"1PB":                  1000000000000000,
		"1E":                   1 << 60,
		"1e":                   1 << 60,
		"7E":                   7 << 60,
		"9EB":                  9000000000000000000,
		"10h":                  36000,
		"2d":                   172800,
		"1 h":                  3600,
		"-2K":                  -2048,
		"0Z":                   0,
		"100000":               100000,
		"262144":               262144,
		"36000":                36000,
		"-9223372036854775808": math.MinInt64,
		"9223372036854775807":  math.MaxInt64,
		"-9007199254740992K":   math.MinInt64,
	}
	for in, want := range ok {
		got, err := parseNumber(in)
		if err != nil || got != want {
			t.Errorf("parseNumber(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	bad := []string{
		"", " ", "abc", "-", "+", "K", "1x", "1KiB", "1mb", "1mB", "1H", "1D",
		"1hh", "1 2", "0x10", "1.5", "8E", "10EB", "1Z", "1Y", "1ZB",
		"9223372036854775808", "-9223372036854775809", "99999999999999999999",
		"9223372036854775807K", "-9007199254740993K",
	}
	for _, in := range bad {
		if got, err := parseNumber(in); err == nil {
			t.Errorf("parseNumber(%q) = %d, want error", in, got)
		}
	}
}

func TestParseBool(t *testing.T) {
	cases := map[string]bool{
		"1": true, "2": true, "-1": true, "10": true, "007": true, "1abc": true, " 1": true,
		"true": true, "True": true, "TRUE": true,
		"0": false, "00": false, "": false, "yes": false, "on": false, "tRUE": false,
		"false": false, "0x1": false, "-0": false, "abc1": false,
	}
	for in, want := range cases {
		if got := parseBool(in); got != want {
			t.Errorf("parseBool(%q) = %v, want %v", in, got, want)
		}
	}
}

func FuzzParseINI(f *testing.F) {
	f.Add([]byte("[dnbd3]\nbasePath=/srv\nmaxPayload=9MB ; c\n"))
	f.Add([]byte("\xEF\xBB\xBF[[::1]:5004]\ncomment:x\n#c\n;c\n[x\n=\n"))
	f.Add([]byte("-127.0.0.1:15102 upstream via tap (private)\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		lines := strings.Count(string(data), "\n") + 1
		_ = parseINI(strings.NewReader(string(data)), func(s, k, v string, n int) {
			if n < 1 || n > lines {
				t.Fatalf("line %d out of 1..%d", n, lines)
			}
			if k != strings.TrimSpace(k) || v != strings.TrimSpace(v) {
				t.Fatalf("untrimmed key %q or value %q", k, v)
			}
			if strings.ContainsAny(k, "=:\n") {
				t.Fatalf("key %q contains a separator", k)
			}
			_ = parseBool(v)
			_, _ = parseNumber(v)
		})
	})
}

func FuzzParseNumber(f *testing.F) {
	for _, s := range []string{"9m", "9M", "9MB", "-1", "10h", "2d", "1KB", "8E", "9223372036854775807"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseNumber(s)
		if err != nil {
			return
		}
		// A plain decimal number must parse to itself.
		if got, err := parseNumber(fmt.Sprint(n)); err != nil || got != n {
			t.Fatalf("%q -> %d, but %d -> %d, %v", s, n, n, got, err)
		}
	})
}

// FuzzConfig feeds arbitrary server.conf text through the key table: no
// panic, problems on existing lines, and the effective configuration
// written back by String reads as the same configuration.
func FuzzConfig(f *testing.F) {
	f.Add([]byte(cfgTestFull))
	f.Add([]byte("[dnbd3]\nbasePath=/\nlistenPort=0x10\nbgrWindowSize=-3\nautoFreeDiskSpaceDelay=-9d\n[limits]\nmaxClients=1E\n[logging]\nconsoleMask=error\n"))
	f.Add([]byte("[LIMITS]\nmaxclients=3\nbackgroundReplicaton=true\nx\n[dnbd3\nbasePath=rel\nbasePath=\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		lines := strings.Count(string(data), "\n") + 1
		l := newConfigFile("server.conf")
		l.parse(strings.NewReader(string(data)), nil)
		for _, p := range l.problems {
			if p.Line < 0 || p.Line > lines || p.Msg == "" {
				t.Fatalf("problem %+v of a %d-line file", p, lines)
			}
		}
		if problemsError(l.problems) != nil {
			return
		}
		again := newConfigFile("server.conf")
		again.parse(strings.NewReader(l.cfg.String()), nil)
		if err := problemsError(again.problems); err != nil || again.cfg != l.cfg {
			t.Fatalf("String() does not read back: %v\n%+v\n%+v", err, l.cfg, again.cfg)
		}
	})
}
