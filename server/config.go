package server

// server.conf: the server's settings, read from the configuration directory
// (-c DIR, default /etc/dnbd3-server) at startup and again on SIGHUP.

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/logging"
)

// ConfigFileName is the name of the settings file in the configuration
// directory.
const configFileName = "server.conf"

// Limits of the reference server.
const (
	// MaxClientsLimit is the hard upper bound of Config.MaxClients.
	maxClientsLimit = 4000
	// MaxImagesLimit is the hard upper bound of Config.MaxImages.
	maxImagesLimit = 5000
	// MinProxyPayload is the smallest Config.MaxPayload a proxy accepts
	// (256 KiB).
	minProxyPayload = 256 << 10
	// MaxBGRWindowSize is the upper bound of Config.BGRWindowSize.
	maxBGRWindowSize = 490
	// minBGRClientsForSparse is the bgrMinClients value from which sparse
	// files stay allowed with full background replication.
	minBGRClientsForSparse = 5
)

// BGRMode is the background replication mode of a proxy
// (backgroundReplication in server.conf).
type bgrMode uint8

// Background replication modes.
const (
	// BGROff replicates nothing in the background: only blocks that clients
	// read (plus prefetch) are cached.
	bgrOff bgrMode = iota
	// BGRFull replicates whole images in the background ("true").
	bgrFull
	// BGRHashblock only completes 16 MiB hash blocks that are already
	// partially cached ("hashblock").
	bgrHashblock
)

// String returns the server.conf spelling: "false", "true" or "hashblock".
func (m bgrMode) String() string {
	switch m {
	case bgrFull:
		return "true"
	case bgrHashblock:
		return "hashblock"
	}
	return "false"
}

// parseBGRMode reads backgroundReplication: "hashblock", else a boolean
// (true = full, false = off).
func parseBGRMode(s string) bgrMode {
	if strings.EqualFold(s, "hashblock") {
		return bgrHashblock
	}
	if parseBool(s) {
		return bgrFull
	}
	return bgrOff
}

// Config holds the settings of server.conf. The zero value is not useful;
// start from DefaultConfig. Durations are stored as time.Duration and written
// back in the unit server.conf uses for the key.
type Config struct {
	// [dnbd3]

	// BasePath is the image root directory (basePath). Required, absolute,
	// without trailing slash. Startup only.
	BasePath string
	// ListenPort is the TCP port for DNBD3, HTTP and iSCSI (listenPort,
	// default 5003). Startup only.
	ListenPort uint16
	// ServerPenalty is a delay after the handshake of peers that are servers
	// (serverPenalty, in µs, default 0).
	ServerPenalty time.Duration
	// ClientPenalty is a delay after the handshake of normal clients
	// (clientPenalty, in µs, default 0).
	ClientPenalty time.Duration
	// IsProxy enables uplink/caching mode (isProxy, default false).
	IsProxy bool
	// BackgroundReplication is the proxy's background replication mode
	// (backgroundReplication: true, hashblock or anything else = off;
	// default true).
	BackgroundReplication bgrMode
	// BGRMinClients: replicate in the background only while an image has at
	// least this many users (bgrMinClients, default 0).
	BGRMinClients int
	// BGRWindowSize is the number of background replication requests in
	// flight per uplink (bgrWindowSize, default 1, clamped to 1…490).
	BGRWindowSize int
	// LookupMissingForProxy: when another proxy asks for an unknown image,
	// fetch it from our uplinks instead of rejecting (lookupMissingForProxy,
	// default true).
	LookupMissingForProxy bool
	// SparseFiles creates replicated images sparse instead of preallocating
	// them (sparseFiles, default false). Forced off with full background
	// replication and BGRMinClients < 5.
	SparseFiles bool
	// IgnoreAllocErrors falls back to sparse files when preallocation fails
	// instead of giving up (ignoreAllocErrors, default false).
	IgnoreAllocErrors bool
	// RemoveMissingImages drops images from the list when their file
	// vanishes or becomes unreadable (removeMissingImages, default true).
	RemoveMissingImages bool
	// UplinkTimeout is the send/receive timeout of uplink connections
	// (uplinkTimeout, in ms, default 5000).
	UplinkTimeout time.Duration
	// ClientTimeout is the send/receive timeout of client connections
	// (clientTimeout, in ms, default 15000).
	ClientTimeout time.Duration
	// CloseUnusedFd closes the files of images unused for an hour
	// (closeUnusedFd, default false).
	CloseUnusedFd bool
	// VMDKLegacyMode loads files without a .rN suffix as revision 1 under
	// their full name (vmdkLegacyMode, default false). Startup only.
	VMDKLegacyMode bool
	// ProxyPrivateOnly uses only private (for=replication) alt servers as
	// uplinks (proxyPrivateOnly, default false).
	ProxyPrivateOnly bool
	// PretendClient does not announce this server as a server to its
	// uplinks (pretendClient, default false).
	PretendClient bool
	// AutoFreeDiskSpaceDelay is the minimum uptime before a proxy may delete
	// old replicated images to make room (autoFreeDiskSpaceDelay, in seconds,
	// default 36000). Negative: never delete.
	AutoFreeDiskSpaceDelay time.Duration
	// ISCSIServer accepts iSCSI logins on the listen port (iScsiServer,
	// default true).
	ISCSIServer bool

	// [limits]

	// MaxClients is the maximum number of client connections (maxClients,
	// default and hard cap 4000). Startup only.
	MaxClients int
	// MaxImages is the maximum number of images (maxImages, default and hard
	// cap 5000). Startup only.
	MaxImages int
	// MaxPayload is the largest request relayed to or accepted from an
	// uplink, in bytes (maxPayload, default 9000000; at least 256 KiB on a
	// proxy).
	MaxPayload int64
	// MaxReplicationSize is the largest image a proxy replicates, in bytes
	// (maxReplicationSize, default 100000000000).
	MaxReplicationSize int64
	// MaxPrefetch bounds the prefetch after a relayed client request, in
	// bytes; 0 disables prefetching (maxPrefetch, default 262144).
	MaxPrefetch int64
	// MinRequestSize extends relayed client requests to at least this many
	// bytes (minRequestSize, default 0).
	MinRequestSize int64

	// [logging]

	// LogFile is the log file path; empty for none (file). The [logging]
	// keys are startup only: the log is set up once.
	LogFile string
	// LogFileMask selects the levels written to LogFile (fileMask, default
	// ERROR WARNING MINOR INFO DEBUG1).
	LogFileMask logging.Mask
	// LogConsoleMask selects the levels written to the console (consoleMask,
	// default ERROR WARNING MINOR INFO).
	LogConsoleMask logging.Mask
	// ConsoleTimestamps prefixes console lines with the time
	// (consoleTimestamps, default false).
	ConsoleTimestamps bool
}

// DefaultConfig returns the reference server's defaults. BasePath is empty:
// server.conf must set it.
func DefaultConfig() Config {
	var c Config
	for i := range configKeys {
		if k := &configKeys[i]; k.def != "" {
			k.parse(&c, k.def) // the defaults are valid: TestConfigKeyTable
		}
	}
	return c
}

// LoadConfig reads dir/server.conf on top of the defaults.
//
// Unknown sections and keys are ignored with a warning ("did you mean"
// when a known key is close). Values that cannot be parsed or are out of
// range give a warning and keep the default or are clamped, like the
// reference does, except where no fallback makes sense (listenPort,
// basePath): those are errors. When prev is not nil (a reload after
// SIGHUP), the startup-only settings (basePath, listenPort,
// vmdkLegacyMode, maxClients, maxImages and the [logging] keys) keep
// prev's values.
//
// The error is non-nil if the file cannot be read, has an error (see
// above) or, on first load, lacks basePath. The warnings are
// "file:line: message" texts.
func LoadConfig(dir string, prev *Config) (Config, []string, error) {
	cf := readConfig(dir, prev)
	var warns []string
	for _, p := range cf.problems {
		if p.Severity == severityWarning {
			warns = append(warns, p.text())
		}
	}
	if err := problemsError(cf.problems); err != nil {
		return Config{}, warns, err
	}
	return cf.cfg, warns, nil
}

// configFile is server.conf as read: the configuration, its problems in
// line order (whole-file ones last), and where each key was set.
type configFile struct {
	path     string
	cfg      Config
	problems []Problem
	lines    map[*configKey]int // line of each key present in the file
	sections map[string]bool    // unknown sections already warned about
}

// newConfigFile returns the defaults, to be read from path.
func newConfigFile(path string) *configFile {
	return &configFile{path: path, cfg: DefaultConfig(), lines: map[*configKey]int{}, sections: map[string]bool{}}
}

// readConfig reads dir/server.conf on top of the defaults (see
// LoadConfig).
func readConfig(dir string, prev *Config) *configFile {
	l := newConfigFile(filepath.Join(dir, configFileName))
	f, err := os.Open(l.path)
	if err != nil {
		if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
			err = pe.Err
		}
		l.add(SeverityError, 0, "cannot read it: %v (pass the configuration directory with -c; it needs a %s with at least [dnbd3] basePath=/path/to/images)", err, configFileName)
		l.cfg = Config{}
		return l
	}
	defer f.Close()
	l.parse(f, prev)
	return l
}

// parse reads server.conf from r (see LoadConfig).
func (l *configFile) parse(r io.Reader, prev *Config) {
	err := parseINI(r, l.set)
	for _, e := range unjoin(err) {
		if se := (*iniSyntaxError)(nil); errors.As(e, &se) {
			l.add(severityWarning, se.Line, "line %d ignored: %s", se.Line, se.Msg)
		} else {
			l.add(SeverityError, 0, "cannot read it: %v", e)
		}
	}
	l.finish(prev)
	slices.SortStableFunc(l.problems, func(a, b Problem) int { return cmp.Compare(lineOrder(a.Line), lineOrder(b.Line)) })
}

// unjoin returns the errors joined in err (errors.Join), err alone, or none.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	if err != nil {
		return []error{err}
	}
	return nil
}

// add records a problem at line (0: the file as a whole).
func (l *configFile) add(sev Severity, line int, format string, args ...any) {
	l.problems = append(l.problems, Problem{Severity: sev, File: l.path, Line: line, Msg: fmt.Sprintf(format, args...)})
}

// line returns the line of [section] name in the file, 0 if absent.
func (l *configFile) line(section, name string) int {
	if k := findConfigKey(section, name); k != nil {
		return l.lines[k]
	}
	return 0
}

// set is the parseINI callback.
func (l *configFile) set(section, name, value string, line int) {
	k := findConfigKey(section, name)
	if k == nil {
		l.unknown(section, name, line)
		return
	}
	if first, ok := l.lines[k]; ok {
		l.add(severityWarning, line, "[%s] %s is set again (first on line %d); this later value counts", section, name, first)
	}
	l.lines[k] = line
	note, err := k.parse(&l.cfg, value)
	switch {
	case err != nil && k.strict:
		l.add(SeverityError, line, "[%s] %s=%s: %v; the server does not start with it (no fallback to a default)", section, name, value, err)
	case err != nil:
		l.add(severityWarning, line, "[%s] %s=%s: %v; keeping the default", section, name, value, err)
	case note != "":
		l.add(severityWarning, line, "[%s] %s=%s: %s", section, name, value, note)
	}
}

// unknown warns about a key that is not in the table, with the known key
// it most likely means.
func (l *configFile) unknown(section, name string, line int) {
	if k := closestConfigKey(name); k != nil {
		l.add(severityWarning, line, "[%s] %s is not a known key (%s); ignored", section, name, k.hint(section, name))
		return
	}
	if !slices.ContainsFunc(configKeys, func(k configKey) bool { return k.section == section }) {
		if !l.sections[section] {
			l.sections[section] = true
			where := fmt.Sprintf("[%s] is not a section of %s", section, configFileName)
			if section == "" {
				where = fmt.Sprintf("%s is outside any section", name)
			}
			l.add(severityWarning, line, "%s (the sections are [dnbd3], [limits] and [logging]); its keys are ignored", where)
		}
		return
	}
	l.add(severityWarning, line, "[%s] %s is not a known key of [%s]; ignored", section, name, section)
}

// finish applies the rules that involve several keys, the required keys
// of a first load and the startup-only rule of a reload.
func (l *configFile) finish(prev *Config) {
	c := &l.cfg
	if prev != nil {
		l.keepStartup(prev)
	} else {
		for i := range configKeys {
			if k := &configKeys[i]; k.required != "" && l.lines[k] == 0 {
				l.add(SeverityError, 0, "[%s] %s is not set: %s", k.section, k.name, k.required)
			}
		}
	}
	if c.IsProxy && c.MaxPayload < minProxyPayload {
		l.add(severityWarning, l.line("limits", "maxPayload"), "[limits] maxPayload=%d is below %d, the minimum for a proxy; using %d", c.MaxPayload, minProxyPayload, minProxyPayload)
		c.MaxPayload = minProxyPayload
	}
	if c.MinRequestSize > c.MaxPayload {
		l.add(severityWarning, l.line("limits", "minRequestSize"), "[limits] minRequestSize=%d is above maxPayload=%d; using %d", c.MinRequestSize, c.MaxPayload, c.MaxPayload)
		c.MinRequestSize = c.MaxPayload
	}
	if c.SparseFiles && c.BackgroundReplication == bgrFull && c.BGRMinClients < minBGRClientsForSparse {
		l.add(severityWarning, l.line("dnbd3", "sparseFiles"), "[dnbd3] sparseFiles=true makes no sense with backgroundReplication=true and bgrMinClients < %d (every replicated image gets filled completely anyway); disabling sparseFiles", minBGRClientsForSparse)
		c.SparseFiles = false
	}
}

// keepStartup restores the startup-only settings from prev, warning about
// changes that need a restart. A required key missing from the file is
// no change.
func (l *configFile) keepStartup(prev *Config) {
	for i := range configKeys {
		k := &configKeys[i]
		if !k.startup {
			continue
		}
		line, set := l.lines[k]
		if was, now := k.format(prev), k.format(&l.cfg); was != now && (set || k.required == "") {
			l.add(severityWarning, line, "%s changed from %q to %q; restart the server to apply it", k.name, was, now)
		}
		k.copy(&l.cfg, prev)
	}
}

// String returns the effective configuration as server.conf text (the RPC
// q=config dump), with values in the units the file uses.
func (c Config) String() string {
	var b strings.Builder
	section := ""
	for i := range configKeys {
		k := &configKeys[i]
		if k.section != section {
			section = k.section
			fmt.Fprintf(&b, "[%s]\n", section)
		}
		fmt.Fprintf(&b, "%s=%s\n", k.name, k.format(&c))
	}
	return b.String()
}
