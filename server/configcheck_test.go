package server

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// problemTexts returns the problems as "severity: file:line: message" with
// the directory replaced by DIR, one per line.
func problemTexts(dir string, probs []Problem) string {
	var b strings.Builder
	for _, p := range probs {
		fmt.Fprintln(&b, strings.ReplaceAll(p.String(), dir, "DIR"))
	}
	return b.String()
}

// wantProblems checks that each of want occurs in the problem list.
func wantProblems(t *testing.T, dir string, probs []Problem, want ...string) {
	t.Helper()
	got := problemTexts(dir, probs)
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("problems lack %q:\n%s", w, got)
		}
	}
}

// TestConfigListenPortStrict: a listenPort that cannot be used stops the
// server (no silent fallback to 5003), named with file and line.
func TestConfigListenPortStrict(t *testing.T) {
	for _, v := range []string{"70000", "0", "abc", "", "-1", "5003x"} {
		dir := cfgTestDir(t, "[dnbd3]\nbasePath=/srv\nlistenPort="+v+"\n")
		_, _, err := LoadConfig(dir, nil)
		if err == nil || !strings.Contains(err.Error(), "server.conf:3: [dnbd3] listenPort="+v+":") {
			t.Errorf("listenPort=%s: error %v, want one naming server.conf:3", v, err)
		}
		d := ReadConfigDir(dir, CheckOptions{})
		wantProblems(t, dir, d.Problems, "DIR/server.conf:3: error: [dnbd3] listenPort="+v)
		if d.Err() == nil {
			t.Errorf("listenPort=%s: ReadConfigDir found no error", v)
		}
	}
	c, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\nlistenPort=65535\n"), nil)
	if err != nil || c.ListenPort != 65535 {
		t.Errorf("listenPort=65535: %d, %v", c.ListenPort, err)
	}
}

// TestConfigBasePathEmpty: "basePath=" is not the file system root.
func TestConfigBasePathEmpty(t *testing.T) {
	c, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "basePath=: empty") {
		t.Errorf("basePath= gave %q, %v; want an error", c.BasePath, err)
	}
	_, _, err = LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=srv/images\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "server.conf:2: [dnbd3] basePath=srv/images: not absolute") {
		t.Errorf("relative basePath: %v", err)
	}
}

// TestConfigUnknownKeyHints: every unknown key is warned about with its
// line, with the known key it most likely means: a typo, another letter
// case, another section.
func TestConfigUnknownKeyHints(t *testing.T) {
	dir := cfgTestDir(t, `stray=1
[dnbd3]
basePath=/srv
backgroundReplicaton=true
maxClients=10
isproxy=true
fileMask=ERROR
noSuchThing=1
[limits]
maxClinets=5
[LIMITS]
maxclients=3
basePath=/other
[extra]
a=1
b=2
`)
	c, warns, err := LoadConfig(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.BasePath != "/srv" || c.MaxClients != maxClientsLimit || c.IsProxy || c.BackgroundReplication != bgrFull {
		t.Errorf("unknown keys changed the config: %+v", c)
	}
	joined := strings.ReplaceAll(strings.Join(warns, "\n"), dir, "DIR")
	for _, w := range []string{
		"DIR/server.conf:1: stray is outside any section (the sections are [dnbd3], [limits] and [logging]); its keys are ignored",
		"DIR/server.conf:4: [dnbd3] backgroundReplicaton is not a known key (did you mean [dnbd3] backgroundReplication?); ignored",
		"DIR/server.conf:5: [dnbd3] maxClients is not a known key (did you mean [limits] maxClients? It belongs below [limits]); ignored",
		"DIR/server.conf:6: [dnbd3] isproxy is not a known key (names are case-sensitive: did you mean [dnbd3] isProxy?); ignored",
		"DIR/server.conf:7: [dnbd3] fileMask is not a known key (did you mean [logging] fileMask? It belongs below [logging]); ignored",
		"DIR/server.conf:8: [dnbd3] noSuchThing is not a known key of [dnbd3]; ignored",
		"DIR/server.conf:10: [limits] maxClinets is not a known key (did you mean [limits] maxClients?); ignored",
		"DIR/server.conf:12: [LIMITS] maxclients is not a known key (names are case-sensitive: did you mean [limits] maxClients?); ignored",
		"DIR/server.conf:13: [LIMITS] basePath is not a known key (did you mean [dnbd3] basePath? It belongs below [dnbd3]); ignored",
		"DIR/server.conf:15: [extra] is not a section of server.conf",
	} {
		if !strings.Contains(joined, w) {
			t.Errorf("warnings lack %q:\n%s", w, joined)
		}
	}
	if n := strings.Count(joined, "[extra]"); n != 1 {
		t.Errorf("unknown section warned %d times, want once:\n%s", n, joined)
	}
	if len(warns) != 10 {
		t.Errorf("%d warnings, want 10:\n%s", len(warns), joined)
	}
}

// TestConfigMaskWarnings: a log mask that selects no level (level words
// are upper-case substrings) or has words that select none is warned
// about, with what was probably meant.
func TestConfigMaskWarnings(t *testing.T) {
	for _, tc := range []struct {
		mask, want string
	}{
		{"error warning", "[logging] consoleMask=error warning: selects no level, so nothing at all is logged there, not even errors (the level words are ERROR, WARNING, MINOR, INFO, DEBUG1, DEBUG2, upper-case); did you mean ERROR WARNING?"},
		{"", "[logging] consoleMask=: selects no level, so nothing at all is logged there, not even errors (the level words are ERROR, WARNING, MINOR, INFO, DEBUG1, DEBUG2, upper-case); e.g. ERROR WARNING MINOR INFO"},
		{"NONE", "consoleMask=NONE: selects no level"},
		{"ERROR WARN DEBUG", "[logging] consoleMask=ERROR WARN DEBUG: WARN DEBUG selects no level and is ignored (the level words are ERROR, WARNING, MINOR, INFO, DEBUG1, DEBUG2, upper-case); did you mean ERROR WARNING DEBUG1 DEBUG2?"},
		{"ERROR WARNING,INFO", ""},
	} {
		c, warns, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\n[logging]\nconsoleMask="+tc.mask+"\n"), nil)
		if err != nil {
			t.Fatal(err)
		}
		joined := strings.Join(warns, "\n")
		if tc.want == "" && len(warns) != 0 || !strings.Contains(joined, tc.want) {
			t.Errorf("consoleMask=%s: warnings %q, want %q", tc.mask, warns, tc.want)
		}
		if c.LogConsoleMask.String() != strings.ToUpper(c.LogConsoleMask.String()) {
			t.Errorf("mask %v", c.LogConsoleMask)
		}
	}
}

// TestConfigDuplicateAndSyntax: a key set twice and every malformed line
// are warned about with their lines; the later value counts.
func TestConfigDuplicateAndSyntax(t *testing.T) {
	c, warns, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\nisProxy=true\nnot a setting\nisProxy=false\n[broken\nalso not\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.IsProxy {
		t.Error("the later isProxy=false did not count")
	}
	joined := strings.Join(warns, "\n")
	for _, w := range []string{"server.conf:4: line 4 ignored", "server.conf:5: [dnbd3] isProxy is set again (first on line 3)",
		"server.conf:6: line 6 ignored: a section line needs a closing ']'", "server.conf:7: line 7 ignored"} {
		if !strings.Contains(joined, w) {
			t.Errorf("warnings lack %q:\n%s", w, joined)
		}
	}
}

// TestReadConfigDirBasePath: basePath must exist, be a directory and, for
// a proxy, be writable (errors, with the basePath line); a server without
// a single image gets a warning.
func TestReadConfigDirBasePath(t *testing.T) {
	root := t.TempDir()
	file := filepath.Join(root, "file")
	writeFile(t, file, []byte("x"))
	empty := filepath.Join(root, "empty")
	os.Mkdir(empty, 0o755)
	withImage := filepath.Join(root, "images")
	writeFile(t, filepath.Join(withImage, "lab", "win.r1"), make([]byte, 4096))
	for _, tc := range []struct {
		base, extra, want string
	}{
		{filepath.Join(root, "missing"), "", "DIR/server.conf:2: error: basePath ROOT/missing does not exist: create it (mkdir -p ROOT/missing) or correct basePath"},
		{file, "", "DIR/server.conf:2: error: basePath ROOT/file is a file, not a directory"},
		{empty, "", "DIR/server.conf:2: warning: basePath ROOT/empty holds no image (files named <name>.r<rid>, e.g. win11.r1): the server serves nothing until some appear"},
		{empty, "isProxy=true\n", ""}, // a proxy fetches its images
		{withImage, "", ""},
	} {
		dir := cfgTestDir(t, "[dnbd3]\nbasePath="+tc.base+"\n"+tc.extra)
		if tc.extra != "" {
			writeFile(t, filepath.Join(dir, altServersFileName), []byte("[192.0.2.1]\ncomment=upstream\n"))
		}
		d := ReadConfigDir(dir, CheckOptions{})
		got := strings.ReplaceAll(problemTexts(dir, d.Problems), root, "ROOT")
		if tc.want == "" && got != "" || !strings.Contains(got, tc.want) {
			t.Errorf("basePath %s: problems\n%s\nwant %q", tc.base, got, tc.want)
		}
		if isErr := strings.Contains(tc.want, "error:"); (d.Err() != nil) != isErr {
			t.Errorf("basePath %s: Err() = %v", tc.base, d.Err())
		}
		// New runs the same checks.
		cfg, _, err := LoadConfig(dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: testutil.Logger(t)})
		if (err != nil) != (d.Err() != nil) {
			t.Errorf("basePath %s: New: %v, ReadConfigDir: %v", tc.base, err, d.Err())
		}
		if srv != nil {
			srv.store.Close()
		}
	}
}

// TestReadConfigDirProxyNotWritable: a proxy needs to write below
// basePath; a read-only basePath is fine for a server that only serves.
func TestReadConfigDirProxyNotWritable(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	testutil.ReadOnlyDir(t, base)
	dir := cfgTestDir(t, "[dnbd3]\nbasePath="+base+"\nisProxy=true\n")
	writeFile(t, filepath.Join(dir, altServersFileName), []byte("[192.0.2.1]\ncomment=upstream\n"))
	d := ReadConfigDir(dir, CheckOptions{})
	wantProblems(t, dir, d.Problems, "DIR/server.conf:2: error: basePath "+base+" is not writable (",
		"but a proxy (isProxy=true) stores the images it replicates there: make it writable for the server's user, or set isProxy=false")
	cfg := d.Config
	if _, err := New(Options{ConfigDir: dir, Config: cfg, Logger: testutil.Logger(t)}); err == nil || !strings.Contains(err.Error(), "not writable") {
		t.Errorf("New with an unwritable proxy basePath: %v", err)
	}
	cfg.IsProxy = false
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatalf("read-only basePath of a plain server: %v", err)
	}
	srv.store.Close()
}

// TestReadConfigDirFiles: problems of every file, in file and line order:
// server.conf, alt-servers (bad lines, unresolvable names), rpc.acl, the
// log file, a proxy without uplinks.
func TestReadConfigDirFiles(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	dir := cfgTestDir(t, "[dnbd3]\nbasePath="+base+"\nisProxy=true\nbackgroundReplicaton=true\n[logging]\nfile=/nonexistent/dir/dnbd3.log\n")
	writeFile(t, filepath.Join(dir, altServersFileName), []byte("[192.0.2.1:99999]\ncomment=bad port\n[198.51.100.1]\nfor=client\n"))
	writeFile(t, filepath.Join(dir, aclFileName), []byte("# admins\n10.0.0.300 ALL\n"))
	d := ReadConfigDir(dir, CheckOptions{})
	got := problemTexts(dir, d.Problems)
	want := `DIR/server.conf:4: warning: [dnbd3] backgroundReplicaton is not a known key (did you mean [dnbd3] backgroundReplication?); ignored
DIR/server.conf:6: error: [logging] file=/nonexistent/dir/dnbd3.log cannot be written: stat /nonexistent/dir: no such file or directory; the server opens it at start: create its directory, fix the permissions or remove the line
DIR/alt-servers:2: warning: invalid host section [192.0.2.1:99999]: invalid port "99999"; section ignored
DIR/alt-servers: warning: isProxy=true, but no alt server may be used as an uplink (only entries without for=client are): the proxy cannot fetch images it does not have; add an upstream server
DIR/rpc.acl:2: warning: invalid address "10.0.0.300"; line ignored
DIR/rpc.acl: error: no line is a valid rule, so the RPC would be open to everyone (as without the file): fix the lines warned about, empty the file to allow everyone, or start with --allow-open-rpc
`
	if got != want {
		t.Errorf("problems\n%s\nwant\n%s", got, want)
	}
	d = ReadConfigDir(dir, CheckOptions{AllowOpenRPC: true})
	wantProblems(t, dir, d.Problems, "DIR/rpc.acl: warning: no line is a valid rule, so the RPC is open to everyone (as without the file), allowed by --allow-open-rpc")

	// A directory that is not there: server.conf is the error, nothing else.
	d = ReadConfigDir(filepath.Join(base, "nope"), CheckOptions{})
	if len(d.Problems) != 1 || d.Err() == nil || !strings.Contains(d.Problems[0].String(), "nope/server.conf: error: cannot read it: no such file or directory") {
		t.Errorf("missing directory: %q", problemTexts("", d.Problems))
	}
}

// TestAltServersUnusableWarnings: a file meant as INI whose sections are
// all unusable is reported as INI, without the legacy format's view of the
// same lines; a legacy file without a usable line is reported as legacy.
func TestAltServersUnusableWarnings(t *testing.T) {
	list, probs := parseAltServers([]byte("[nowhere.test]\ncomment=x\n"), altNoResolve)
	if got := strings.Join(lineWarnings("", probs), "\n"); len(list) != 0 || got != "line 2: invalid host section [nowhere.test]: cannot resolve nowhere.test: no such host; section ignored" {
		t.Errorf("INI file: %d entries, warnings:\n%s", len(list), got)
	}
	list, probs = parseAltServers([]byte("-nowhere.test:5003 private\n"), altNoResolve)
	if got := strings.Join(lineWarnings("", probs), "\n"); len(list) != 0 || got != `line 1: invalid alt server "-nowhere.test:5003": cannot resolve nowhere.test: no such host; line ignored` {
		t.Errorf("legacy file: %d entries, warnings:\n%s", len(list), got)
	}
}
