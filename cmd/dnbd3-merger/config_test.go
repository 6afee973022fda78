package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

// referenceSettings is the reference's appsettings.json (spec §2).
const referenceSettings = `{
  "Logging": {
    "LogLevel": {
      "Default": "Debug",
      "Microsoft": "Warning",
      "Microsoft.Hosting.Lifetime": "Information"
    },
    "Console": {
      "TimestampFormat": "[dd-MM-yyyy HH:mm:ss] "
    }
  },
  "Settings": {
    "WorkingDirectory": "../../../WorkingDirectory",
    "OriginalImageDirectory": "../../../OriginalImageDirectory",
    "DestinationDirectory": "../../../Output"
  },
  "AllowedHosts": "*",
  "Urls": "http://localhost:5000"
}
`

// tree makes the reference's layout: cwd = root/a/b/c, the directories
// three levels up.
func tree(t *testing.T) (root, cwd string) {
	t.Helper()
	root = t.TempDir()
	cwd = filepath.Join(root, "a", "b", "c")
	for _, d := range []string{cwd, filepath.Join(root, "WorkingDirectory"), filepath.Join(root, "OriginalImageDirectory"), filepath.Join(root, "Output")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root, cwd
}

// configFor parses args and builds the configuration.
func configFor(t *testing.T, cwd string, args ...string) (config, error) {
	t.Helper()
	var f flags
	var stderr bytes.Buffer
	fs := newFlagSet(&f, &stderr)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse %v: %v", args, err)
	}
	return buildConfig(&f, cwd)
}

func urlsOf(c config) []string {
	var out []string
	for _, u := range c.urls {
		out = append(out, u.scheme+" "+u.host+" "+strconv.Itoa(u.port))
	}
	return out
}

func TestReferenceSettingsFile(t *testing.T) {
	root, cwd := tree(t)
	if err := os.WriteFile(filepath.Join(cwd, "appsettings.json"), []byte(referenceSettings), 0o644); err != nil {
		t.Fatal(err)
	}
	// The default file in the working directory, relative paths against it.
	c, err := configFor(t, cwd)
	if err != nil {
		t.Fatal(err)
	}
	if c.settingsFile != filepath.Join(cwd, "appsettings.json") ||
		c.workingDir != filepath.Join(root, "WorkingDirectory") ||
		c.originalDir != filepath.Join(root, "OriginalImageDirectory") ||
		c.destinationDir != filepath.Join(root, "Output") {
		t.Fatalf("config = %+v", c)
	}
	if got := urlsOf(c); !reflect.DeepEqual(got, []string{"http localhost 5000"}) {
		t.Errorf("urls = %v", got)
	}
	// Defaults of the engine settings.
	if c.retention != 24*time.Hour || c.abandonAfter != 7*24*time.Hour || c.maxMerges != 2 || c.minFreeSpace != 1<<30 || c.shutdown != 30*time.Second {
		t.Errorf("defaults: %+v", c)
	}
}

func TestSettingsVariants(t *testing.T) {
	root, cwd := tree(t)
	other := filepath.Join(root, "other")
	os.Mkdir(other, 0o755)
	// Comments, trailing commas, other key case, Urls lists; relative to
	// the process's directory, not the file's.
	file := filepath.Join(root, "conf.json")
	content := `// dnbd3go merger
{
  /* the directories */
  "settings": {
    "workingDirectory": "../../../WorkingDirectory", // a comment with "quotes"
    "ORIGINALIMAGEDIRECTORY": "` + filepath.Join(root, "OriginalImageDirectory") + `",
    "DestinationDirectory": "../../../Output",
  },
  "Urls": "http://localhost:5000;https://0.0.0.0:5001; http://[::1]:5002 ;http://*:5003;http://+;https://merger.example",
  "Kestrel": {"Url": "http://x//y/*z*/"},
}`
	if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := configFor(t, cwd, "--settings", file, "--tls-cert", "c.pem", "--tls-key", "k.pem")
	if err != nil {
		t.Fatal(err)
	}
	if c.workingDir != filepath.Join(root, "WorkingDirectory") || c.originalDir != filepath.Join(root, "OriginalImageDirectory") {
		t.Fatalf("config = %+v", c)
	}
	want := []string{"http localhost 5000", "https 0.0.0.0 5001", "http ::1 5002", "http * 5003", "http + 80", "https merger.example 443"}
	if got := urlsOf(c); !reflect.DeepEqual(got, want) {
		t.Errorf("urls = %v, want %v", got, want)
	}

	// Flags override the file; --listen replaces Urls.
	c, err = configFor(t, cwd, "--settings", file, "--working-dir", other, "--destination-dir", "../../..",
		"--listen", "http://127.0.0.1:0", "--listen", "http://127.0.0.2:7000,http://[::1]:7001;:7002",
		"--retention", "36h", "--abandon-after", "3d", "--max-merges", "5", "--min-free-space", "512M",
		"--log-format", "json", "--log-level", "debug", "--shutdown-timeout", "5s")
	if err != nil {
		t.Fatal(err)
	}
	if c.workingDir != other || c.destinationDir != root || c.originalDir != filepath.Join(root, "OriginalImageDirectory") {
		t.Fatalf("overridden dirs: %+v", c)
	}
	want = []string{"http 127.0.0.1 0", "http 127.0.0.2 7000", "http ::1 7001", "http  7002"}
	if got := urlsOf(c); !reflect.DeepEqual(got, want) {
		t.Errorf("urls = %v, want %v", got, want)
	}
	if c.retention != 36*time.Hour || c.abandonAfter != 72*time.Hour || c.maxMerges != 5 || c.minFreeSpace != 512<<20 ||
		c.logFormat != "json" || c.logLevel != -4 || c.shutdown != 5*time.Second {
		t.Errorf("flags: %+v", c)
	}

	// Flags alone, without any settings file.
	empty := t.TempDir()
	c, err = configFor(t, empty, "--working-dir", other, "--original-dir", other, "--destination-dir", other)
	if err != nil || c.settingsFile != "" || !reflect.DeepEqual(urlsOf(c), []string{"http localhost 5000"}) {
		t.Fatalf("flags only: %+v, %v", c, err)
	}
}

func TestConfigErrors(t *testing.T) {
	root, cwd := tree(t)
	write := func(name, content string) string {
		p := filepath.Join(root, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.json", referenceSettings)
	missing := write("missing.json", strings.Replace(referenceSettings, "../../../Output", "../../../NoSuchDir", 1))
	noDest := write("nodest.json", strings.Replace(referenceSettings, `"DestinationDirectory": "../../../Output"`, `"X": 1`, 1))
	https := write("https.json", strings.Replace(referenceSettings, "http://localhost:5000", "http://localhost:5000;https://*:5001", 1))
	badURL := write("badurl.json", strings.Replace(referenceSettings, "http://localhost:5000", "ftp://localhost:21", 1))
	notJSON := write("bad.json", "Settings.WorkingDirectory = /x\n")
	aFile := write("file", "")

	for _, c := range []struct {
		args  []string
		usage bool
		want  []string // all in the message
	}{
		{[]string{"--settings", missing}, false, []string{"Settings.DestinationDirectory", "NoSuchDir", "does not exist"}},
		{[]string{"--settings", noDest}, false, []string{"Settings.DestinationDirectory is not set", "--destination-dir"}},
		{[]string{"--settings", good, "--working-dir", "/nonexistent/dir"}, false, []string{"Settings.WorkingDirectory", "--working-dir", "/nonexistent/dir"}},
		{[]string{"--settings", good, "--original-dir", aFile}, false, []string{"Settings.OriginalImageDirectory", "not a directory"}},
		{[]string{"--settings", https}, false, []string{"Urls", "https://*:5001", "--tls-cert"}},
		{[]string{"--settings", badURL}, false, []string{"Urls", "ftp"}},
		{[]string{"--settings", notJSON}, false, []string{"bad.json", "JSON"}},
		{[]string{"--settings", filepath.Join(root, "nope.json")}, false, []string{"settings file", "nope.json"}},
		{[]string{"--settings", good, "--listen", "https://0.0.0.0:5001"}, true, []string{"https needs --tls-cert"}},
		{[]string{"--settings", good, "--tls-cert", "c.pem"}, true, []string{"--tls-key"}},
		{[]string{"--settings", good, "--listen", "http://h/x"}, true, []string{"path"}},
		{[]string{"--settings", good, "--listen", "http://h:99999"}, true, []string{"port"}},
		{[]string{"--settings", good, "--listen", ";"}, true, []string{"no URL"}},
		{[]string{"--settings", good, "--retention", "soon"}, true, []string{"--retention"}},
		{[]string{"--settings", good, "--abandon-after", "-1h"}, true, []string{"--abandon-after"}},
		{[]string{"--settings", good, "--min-free-space", "10X"}, true, []string{"--min-free-space"}},
		{[]string{"--settings", good, "--max-merges", "0"}, true, []string{"--max-merges"}},
		{[]string{"--settings", good, "--log-format", "xml"}, true, []string{"--log-format"}},
		{[]string{"--settings", good, "--log-level", "loud"}, true, []string{"--log-level"}},
	} {
		_, err := configFor(t, cwd, c.args...)
		if err == nil {
			t.Errorf("%v: no error", c.args)
			continue
		}
		var ue usageError
		if isUsage := errors.As(err, &ue); isUsage != c.usage {
			t.Errorf("%v: usage error %v, want %v (%v)", c.args, isUsage, c.usage, err)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: error %q lacks %q", c.args, err, w)
			}
		}
	}
	// No settings file and no flags: the first missing setting is named.
	if _, err := configFor(t, t.TempDir()); err == nil || !strings.Contains(err.Error(), "Settings.WorkingDirectory is not set") {
		t.Errorf("nothing configured: %v", err)
	}
}

func TestRelaxedJSON(t *testing.T) {
	for in, want := range map[string]string{
		`{"a": "x//y", "b": "/*z*/"}`:  `{"a": "x//y", "b": "/*z*/"}`,
		"{\"a\": 1, // c \"q\n}":       "{\"a\": 1         \n}",
		`{"a": [1, 2, ], }`:            `{"a": [1, 2  ]  }`,
		`{"a": "\"//", /* x */ "b":1}`: `{"a": "\"//",         "b":1}`,
		"/* unterminated":              "               ",
	} {
		if got := string(relaxedJSON([]byte(in))); got != want {
			t.Errorf("relaxedJSON(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseListenURL(t *testing.T) {
	for _, bad := range []string{"ftp://h:1", "http://h:x", "http://h:-1", "http://[::1:80", "http://h/a", "http://a:b:c:1", "http://u@h:1"} {
		if u, err := parseListenURL(bad); err == nil {
			t.Errorf("parseListenURL(%q) = %+v, want an error", bad, u)
		}
	}
	for in, want := range map[string]string{
		"HTTP://LocalHost:5000/": "http LocalHost 5000",
		"https://[::]":           "https :: 443",
		"127.0.0.1:8080":         "http 127.0.0.1 8080",
		":0":                     "http  0",
	} {
		u, err := parseListenURL(in)
		if err != nil || u.scheme+" "+u.host+" "+strconv.Itoa(u.port) != want {
			t.Errorf("parseListenURL(%q) = %+v, %v; want %s", in, u, err, want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{"7d": 7 * 24 * time.Hour, "0d": 0, "90m": 90 * time.Minute, "1h30m": 90 * time.Minute, " 2d ": 48 * time.Hour} {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("parseDuration(%q) = %v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "d", "1.5d", "-1d", "x", "-5m"} {
		if _, err := parseDuration(bad); err == nil {
			t.Errorf("parseDuration(%q): no error", bad)
		}
	}
}

// TestExamples checks that the shipped settings file has the reference's
// keys and that the systemd unit starts the command with it.
func TestExamples(t *testing.T) {
	s, err := loadSettings(filepath.Join("..", "..", "examples", "merger", "appsettings.json"))
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]*string{
		keyWorkingDirectory: s.Settings.WorkingDirectory, keyOriginalImageDirectory: s.Settings.OriginalImageDirectory,
		keyDestinationDirectory: s.Settings.DestinationDirectory, keyUrls: s.Urls,
	} {
		if v == nil || *v == "" {
			t.Errorf("example settings lack %s", name)
		} else if name != keyUrls && !filepath.IsAbs(*v) {
			t.Errorf("example %s = %q is not absolute", name, *v)
		}
	}
	for _, raw := range splitList(*s.Urls) {
		if _, err := parseListenURL(raw); err != nil {
			t.Error(err)
		}
	}
	// The example lists every limit, with its default.
	var f flags
	newFlagSet(&f, io.Discard)
	defaults, err := buildLimits(f.limits, f.given, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	l, err := buildLimits(f.limits, f.given, s.Limits, "example")
	if err != nil || l != defaults || len(s.Limits) != len(limitDefs) {
		t.Errorf("example Limits: %+v (%d keys), %v; want every key with the defaults %+v", l, len(s.Limits), err, defaults)
	}
	unit, err := os.ReadFile(filepath.Join("..", "..", "examples", "dnbd3-merger.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"\nType=notify\n", "\nUser=dnbd3-merger\n", "\nExecStart=/usr/bin/dnbd3-merger --settings /etc/dnbd3-merger/appsettings.json\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", strings.TrimSpace(want))
		}
	}
}
