package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/logging"
)

// cfgTestDir writes server.conf with the given text into a new directory.
func cfgTestDir(t *testing.T, text string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, configFileName), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

const cfgTestFull = `; full sample, every key
[dnbd3]
basePath=/srv/dnbd3/
listenPort=5004
serverPenalty=100000
clientPenalty=1K
isProxy=true
backgroundReplication=hashblock
bgrMinClients=2
bgrWindowSize=8
lookupMissingForProxy=false
sparseFiles=TRUE
ignoreAllocErrors=1
removeMissingImages=0
uplinkTimeout=1250
clientTimeout=1m            ; minutes quirk: 60 (ms)
closeUnusedFd=True
vmdkLegacyMode=yes          ; "yes" is false
proxyPrivateOnly=true
pretendClient=true
autoFreeDiskSpaceDelay=10h
iScsiServer=false

[limits]
maxClients=1000
maxImages=2K
maxPayload=9MB
maxReplicationSize=100G
maxPrefetch=512k
minRequestSize=64KB

[logging]
file=/var/log/dnbd3.log
fileMask=ERROR WARNING DEBUG2
consoleMask=ERROR
consoleTimestamps=true
`

func TestConfigFull(t *testing.T) {
	c, warns, err := LoadConfig(cfgTestDir(t, cfgTestFull), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 0 {
		t.Errorf("unexpected warnings: %q", warns)
	}
	want := Config{
		BasePath:               "/srv/dnbd3",
		ListenPort:             5004,
		ServerPenalty:          100 * time.Millisecond,
		ClientPenalty:          1024 * time.Microsecond,
		IsProxy:                true,
		BackgroundReplication:  bgrHashblock,
		BGRMinClients:          2,
		BGRWindowSize:          8,
		LookupMissingForProxy:  false,
		SparseFiles:            true, // BGR is not full, so it stays
		IgnoreAllocErrors:      true,
		RemoveMissingImages:    false,
		UplinkTimeout:          1250 * time.Millisecond,
		ClientTimeout:          60 * time.Millisecond,
		CloseUnusedFd:          true,
		VMDKLegacyMode:         false,
		ProxyPrivateOnly:       true,
		PretendClient:          true,
		AutoFreeDiskSpaceDelay: 10 * time.Hour,
		ISCSIServer:            false,
		MaxClients:             1000,
		MaxImages:              2048,
		MaxPayload:             9000000,
		MaxReplicationSize:     100 << 30,
		MaxPrefetch:            512 << 10,
		MinRequestSize:         64000,
		LogFile:                "/var/log/dnbd3.log",
		LogFileMask:            logging.MaskError | logging.MaskWarning | logging.MaskDebug2,
		LogConsoleMask:         logging.MaskError,
		ConsoleTimestamps:      true,
	}
	if c != want {
		t.Errorf("got\n%+v\nwant\n%+v", c, want)
	}

	s := c.String()
	for _, line := range []string{
		"[dnbd3]\nbasePath=/srv/dnbd3\n", "listenPort=5004\n", "serverPenalty=100000\n",
		"clientPenalty=1024\n", "isProxy=true\n", "backgroundReplication=hashblock\n",
		"bgrMinClients=2\n", "bgrWindowSize=8\n", "lookupMissingForProxy=false\n",
		"sparseFiles=true\n", "removeMissingImages=false\n", "uplinkTimeout=1250\n",
		"clientTimeout=60\n", "autoFreeDiskSpaceDelay=36000\n", "iScsiServer=false\n",
		"[limits]\nmaxClients=1000\n", "maxImages=2048\n", "maxPayload=9000000\n",
		"maxReplicationSize=107374182400\n", "maxPrefetch=524288\n", "minRequestSize=64000\n",
		"[logging]\nfile=/var/log/dnbd3.log\n", "fileMask=ERROR WARNING DEBUG2\n",
		"consoleMask=ERROR\n", "consoleTimestamps=true\n",
	} {
		if !strings.Contains(s, line) {
			t.Errorf("String() lacks %q:\n%s", line, s)
		}
	}

	// The dump is itself a valid server.conf describing the same config.
	c2, warns, err := LoadConfig(cfgTestDir(t, s), nil)
	if err != nil || len(warns) != 0 {
		t.Fatalf("reloading String(): %v %q", err, warns)
	}
	if c2 != c {
		t.Errorf("String() round trip differs:\n%+v\n%+v", c2, c)
	}
}

func TestConfigDefaults(t *testing.T) {
	c, warns, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\n[unknown]\nfoo=bar\n[dnbd3]\nnoSuchKey=1\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Unknown sections and keys are ignored, with a warning each.
	if len(warns) != 2 || !strings.Contains(warns[0], ":4: [unknown] is not a section") || !strings.Contains(warns[1], ":6: [dnbd3] noSuchKey is not a known key") {
		t.Errorf("unknown section and key: warnings %q", warns)
	}
	want := DefaultConfig()
	want.BasePath = "/srv"
	if c != want {
		t.Errorf("got\n%+v\nwant\n%+v", c, want)
	}
	d := DefaultConfig()
	if d.ListenPort != 5003 || d.ClientTimeout != 15*time.Second || d.UplinkTimeout != 5*time.Second ||
		d.BackgroundReplication != bgrFull || d.BGRWindowSize != 1 || !d.LookupMissingForProxy ||
		!d.RemoveMissingImages || d.AutoFreeDiskSpaceDelay != 36000*time.Second || !d.ISCSIServer ||
		d.MaxClients != 4000 || d.MaxImages != 5000 || d.MaxPayload != 9000000 ||
		d.MaxReplicationSize != 100000000000 || d.MaxPrefetch != 262144 || d.MinRequestSize != 0 ||
		d.IsProxy || d.SparseFiles || d.ServerPenalty != 0 || d.ClientPenalty != 0 || d.BGRMinClients != 0 ||
		d.LogFile != "" || d.LogFileMask.String() != "ERROR WARNING MINOR INFO DEBUG1" ||
		d.LogConsoleMask.String() != "ERROR WARNING MINOR INFO" || d.ConsoleTimestamps {
		t.Errorf("DefaultConfig() = %+v", d)
	}
	if !strings.Contains(c.String(), "autoFreeDiskSpaceDelay=36000\n") || !strings.Contains(c.String(), "backgroundReplication=true\n") {
		t.Errorf("String() of defaults:\n%s", c.String())
	}
}

func TestConfigBasePathErrors(t *testing.T) {
	if _, _, err := LoadConfig(t.TempDir(), nil); err == nil || !strings.Contains(err.Error(), "server.conf") {
		t.Errorf("missing file: error = %v", err)
	}
	_, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nlistenPort=5003\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "basePath") {
		t.Errorf("missing basePath: error = %v", err)
	}
	_, _, err = LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=images/\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "not absolute") {
		t.Errorf("relative basePath: error = %v", err)
	}
	_, _, err = LoadConfig(cfgTestDir(t, "[limits]\nbasePath=/srv\n"), nil)
	if err == nil {
		t.Error("basePath in the wrong section accepted")
	}
	c, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/\n"), nil)
	if err != nil || c.BasePath != "/" {
		t.Errorf("basePath=/ gave %q, %v", c.BasePath, err)
	}
}

func TestConfigReloadKeepsStartupKeys(t *testing.T) {
	first, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/a\nlistenPort=5010\nvmdkLegacyMode=1\nisProxy=0\n[limits]\nmaxClients=100\nmaxImages=200\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := cfgTestDir(t, "[dnbd3]\nbasePath=/b\nlistenPort=6000\nvmdkLegacyMode=0\nisProxy=1\nclientPenalty=5\n[limits]\nmaxClients=300\nmaxImages=400\n")
	c, warns, err := LoadConfig(dir, &first)
	if err != nil {
		t.Fatal(err)
	}
	if c.BasePath != "/a" || c.ListenPort != 5010 || !c.VMDKLegacyMode || c.MaxClients != 100 || c.MaxImages != 200 {
		t.Errorf("startup-only keys changed on reload: %+v", c)
	}
	if !c.IsProxy || c.ClientPenalty != 5*time.Microsecond {
		t.Errorf("reloadable keys not applied: %+v", c)
	}
	joined := strings.Join(warns, "\n")
	for _, k := range []string{"basePath", "listenPort", "vmdkLegacyMode", "maxClients", "maxImages"} {
		if !strings.Contains(joined, k+" changed") {
			t.Errorf("no restart warning for %s in %q", k, warns)
		}
	}
	// A reload without basePath is fine: the running one is kept.
	c, _, err = LoadConfig(cfgTestDir(t, "[dnbd3]\nisProxy=1\n"), &first)
	if err != nil || c.BasePath != "/a" {
		t.Errorf("reload without basePath: %q, %v", c.BasePath, err)
	}
	// Keys removed from the file go back to their defaults on reload.
	if c.ClientPenalty != 0 {
		t.Errorf("clientPenalty not reset: %v", c.ClientPenalty)
	}
}

func TestConfigSparseRule(t *testing.T) {
	cases := []struct {
		conf   string
		sparse bool
		warn   bool
	}{
		{"sparseFiles=true\n", false, true}, // default BGR full, bgrMinClients 0
		{"sparseFiles=true\nbgrMinClients=4\n", false, true},
		{"sparseFiles=true\nbgrMinClients=5\n", true, false},
		{"sparseFiles=true\nbackgroundReplication=false\n", true, false},
		{"sparseFiles=true\nbackgroundReplication=hashblock\n", true, false},
		{"sparseFiles=false\n", false, false},
	}
	for _, tc := range cases {
		c, warns, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\n"+tc.conf), nil)
		if err != nil {
			t.Fatal(err)
		}
		if c.SparseFiles != tc.sparse {
			t.Errorf("%q: SparseFiles = %v, want %v", tc.conf, c.SparseFiles, tc.sparse)
		}
		if got := strings.Contains(strings.Join(warns, "\n"), "sparseFiles"); got != tc.warn {
			t.Errorf("%q: warning = %v (%q), want %v", tc.conf, got, warns, tc.warn)
		}
	}
}

func TestConfigValueRules(t *testing.T) {
	conf := `[dnbd3]
basePath=/srv
isProxy=true
bgrWindowSize=1000
uplinkTimeout=soon
clientTimeout=0
serverPenalty=-5
autoFreeDiskSpaceDelay=-1
backgroundReplication=yes
BasePath=/other
[limits]
maxPayload=64K
maxClients=9999
maxImages=1E
maxPrefetch=0
maxReplicationSize=8E
`
	c, warns, err := LoadConfig(cfgTestDir(t, conf), nil)
	if err != nil {
		t.Fatal(err)
	}
	d := DefaultConfig()
	if c.UplinkTimeout != d.UplinkTimeout || c.ClientTimeout != d.ClientTimeout ||
		c.ServerPenalty != 0 || c.MaxReplicationSize != d.MaxReplicationSize {
		t.Errorf("bad values should keep defaults: %+v", c)
	}
	if c.BGRWindowSize != maxBGRWindowSize {
		t.Errorf("bgrWindowSize = %d, want clamp to %d", c.BGRWindowSize, maxBGRWindowSize)
	}
	if c.AutoFreeDiskSpaceDelay >= 0 || !strings.Contains(c.String(), "autoFreeDiskSpaceDelay=-1\n") {
		t.Errorf("autoFreeDiskSpaceDelay=-1 not disabled: %v", c.AutoFreeDiskSpaceDelay)
	}
	if c.BackgroundReplication != bgrOff {
		t.Errorf("backgroundReplication=yes = %v, want off", c.BackgroundReplication)
	}
	if c.MaxPayload != minProxyPayload {
		t.Errorf("proxy maxPayload = %d, want %d", c.MaxPayload, minProxyPayload)
	}
	if c.MaxClients != maxClientsLimit || c.MaxImages != maxImagesLimit || c.MaxPrefetch != 0 {
		t.Errorf("limits: %+v", c)
	}
	if c.BasePath != "/srv" {
		t.Errorf("BasePath = %q (keys are case-sensitive)", c.BasePath)
	}
	joined := strings.Join(warns, "\n")
	for _, w := range []string{"bgrWindowSize", "uplinkTimeout", "clientTimeout", "serverPenalty",
		"maxPayload", "maxClients", "maxImages", "maxReplicationSize", "BasePath"} {
		if !strings.Contains(joined, w) {
			t.Errorf("no warning mentioning %s in:\n%s", w, joined)
		}
	}
	if !strings.Contains(joined, configFileName+":") {
		t.Errorf("warnings should name the file: %q", warns)
	}

	// Non-proxy: small maxPayload is kept, minRequestSize is capped by it.
	c, _, err = LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\n[limits]\nmaxPayload=64K\nminRequestSize=1M\n"), nil)
	if err != nil || c.MaxPayload != 65536 || c.MinRequestSize != 65536 {
		t.Errorf("non-proxy maxPayload/minRequestSize = %d/%d, %v", c.MaxPayload, c.MinRequestSize, err)
	}
	// Garbage lines give a warning, not an error.
	_, warns, err = LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/srv\nthis is not ini\n"), nil)
	if err != nil || len(warns) != 1 || !strings.Contains(warns[0], "line 3") {
		t.Errorf("syntax error: %v %q", err, warns)
	}
}

// TestConfigReloadLoggingKeys: the log is set up once at start, so a
// reload keeps the [logging] settings in effect and says that a change
// needs a restart, instead of showing settings that are not applied.
func TestConfigReloadLoggingKeys(t *testing.T) {
	first, _, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/a\n[logging]\nconsoleMask=ERROR\nfile=/var/log/a.log\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	c, warns, err := LoadConfig(cfgTestDir(t, "[dnbd3]\nbasePath=/a\n[logging]\nconsoleMask=ERROR WARNING\nconsoleTimestamps=true\n"), &first)
	if err != nil {
		t.Fatal(err)
	}
	if c.LogConsoleMask != first.LogConsoleMask || c.LogFile != "/var/log/a.log" || c.ConsoleTimestamps {
		t.Errorf("[logging] changed on reload: %+v", c)
	}
	joined := strings.Join(warns, "\n")
	for _, w := range []string{`server.conf:4: consoleMask changed from "ERROR" to "ERROR WARNING"; restart the server to apply it`,
		`server.conf:5: consoleTimestamps changed from "false" to "true"`, `server.conf: file changed from "/var/log/a.log" to ""`} {
		if !strings.Contains(joined, w) {
			t.Errorf("warnings lack %q:\n%s", w, joined)
		}
	}
}

// TestConfigReloadWithError: a reload of a file with an error applies
// none of it; the running configuration stays.
func TestConfigReloadWithError(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "img.r1"), make([]byte, 4096))
	ts := startServer(t, base, "clientPenalty=5\n", nil)
	writeFile(t, filepath.Join(ts.configDir, configFileName), []byte("[dnbd3]\nbasePath="+base+"\nclientPenalty=7\nlistenPort=abc\n"))
	if err := ts.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := ts.config().ClientPenalty; got != 5*time.Microsecond {
		t.Errorf("clientPenalty = %v after a reload of a broken file, want the running 5µs", got)
	}
}
