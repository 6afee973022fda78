package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/logging"
	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/spf13/pflag"
)

// defaultURL is where the reference listens without a Urls setting.
const defaultURL = "http://localhost:5000"

// flags are the command line as given.
type flags struct {
	settings        string
	workingDir      string
	originalDir     string
	destinationDir  string
	listen          []string
	retention       string
	abandonAfter    string
	maxMerges       int
	minFreeSpace    string
	tokenFile       string
	tlsCert         string
	tlsKey          string
	logFormat       string
	logLevel        string
	shutdownTimeout time.Duration
	version         bool
	helpOut         io.Writer // where --help prints (stdout); nil: the flag set's output
	limits          limitFlags
	metricsNoAuth   bool

	fs *pflag.FlagSet // to ask which flags were given
}

// config is the merged configuration: the settings file, overridden by
// flags, validated.
type config struct {
	settingsFile   string // "" if none was read
	workingDir     string // absolute
	originalDir    string
	destinationDir string
	urls           []listenURL
	retention      time.Duration
	abandonAfter   time.Duration
	maxMerges      int
	minFreeSpace   int64
	tokenFile      string
	tlsCert        string
	tlsKey         string
	logFormat      string
	logLevel       slog.Level
	shutdown       time.Duration
	limits         limits
	metricsNoAuth  bool
}

// usageError is a bad command line (exit code 2); other configuration
// errors exit with 1.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// newFlagSet defines the command's flags.
func newFlagSet(f *flags, stderr io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet("dnbd3-merger", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(stderr)
	fs.StringVar(&f.settings, "settings", defaultSettingsFile, "the reference's appsettings.json (Settings.*Directory, Urls); the default file is optional, \"\" reads none")
	fs.StringVar(&f.workingDir, "working-dir", "", "session directory (overrides "+keyWorkingDirectory+")")
	fs.StringVar(&f.originalDir, "original-dir", "", "directory of the original images NAME.rREV (overrides "+keyOriginalImageDirectory+")")
	fs.StringVar(&f.destinationDir, "destination-dir", "", "where merged revisions go, e.g. dnbd3-server's basePath (overrides "+keyDestinationDirectory+")")
	fs.StringArrayVar(&f.listen, "listen", nil, "listen URL, e.g. http://0.0.0.0:5000 or https://[::]:5443; repeatable or a comma/semicolon list (overrides Urls; default "+defaultURL+")")
	fs.StringVar(&f.retention, "retention", "24h", "how long merged and failed sessions are kept (Go duration or days, e.g. 36h, 7d)")
	fs.StringVar(&f.abandonAfter, "abandon-after", "7d", "delete sessions without uploads for this long")
	fs.IntVar(&f.maxMerges, "max-merges", merger.DefaultMaxConcurrentMerges, "merges that may run at once (more get 503 + Retry-After)")
	fs.StringVar(&f.minFreeSpace, "min-free-space", "1G", "free space uploads and merges must leave (K, M, G, T suffixes; 0 disables the check)")
	f.limits = defineLimitFlags(fs)
	fs.StringVar(&f.tokenFile, "token-file", "", "file with a bearer token every request must carry (keep it unreadable for others)")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "PEM certificate (chain) for https:// listen URLs")
	fs.StringVar(&f.tlsKey, "tls-key", "", "PEM private key for https:// listen URLs")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "lowest level logged: error, warning, info, debug (every request) or debug2")
	fs.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 30*time.Second, "on SIGTERM, how long requests in flight may take to finish")
	fs.BoolVar(&f.metricsNoAuth, "metrics-no-auth", false, "serve the Prometheus metrics at /metrics without the token (the API and the status page keep needing it)")
	fs.BoolVarP(&f.version, "version", "v", false, "print the version and exit")
	fs.Usage = func() {
		out := fs.Output()
		if f.helpOut != nil {
			out = f.helpOut
		}
		io.WriteString(out, "Usage: dnbd3-merger [--settings appsettings.json] [--working-dir DIR --original-dir DIR --destination-dir DIR] [--listen URL]...\n\n"+
			"Receives the changed clusters of dnbd3 copy-on-write sessions and merges them into the\n"+
			"image's next revision (the REST API of cow_merger_service, /v1/File/* and /api/File/*).\n"+
			"Settings come from the reference's appsettings.json; flags override them.\n\nFlags:\n"+fs.FlagUsages())
	}
	f.fs = fs
	return fs
}

// given reports whether a flag was set on the command line.
func (f *flags) given(name string) bool { return f.fs.Changed(name) }

// parseDuration parses a Go duration or a whole number of days ("7d").
func parseDuration(s string) (time.Duration, error) {
	t := strings.TrimSpace(s)
	if d, ok := strings.CutSuffix(t, "d"); ok {
		n, err := strconv.ParseInt(d, 10, 64)
		if err != nil || n < 0 || n > 100*365 {
			return 0, fmt.Errorf("bad duration %q: want e.g. 36h, 90m or 7d", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	dur, err := time.ParseDuration(t)
	if err != nil || dur < 0 {
		return 0, fmt.Errorf("bad duration %q: want e.g. 36h, 90m or 7d", s)
	}
	return dur, nil
}

// check validates what the command line alone decides (errors are
// usageErrors, exit 2) and fills in those parts of c.
func (f *flags) check(c *config) error {
	var err error
	if c.retention, err = parseDuration(f.retention); err != nil {
		return usagef("--retention: %w", err)
	}
	if c.abandonAfter, err = parseDuration(f.abandonAfter); err != nil {
		return usagef("--abandon-after: %w", err)
	}
	if f.maxMerges < 1 {
		return usagef("--max-merges must be at least 1")
	}
	c.maxMerges = f.maxMerges
	if c.minFreeSpace, err = units.ParseSize(f.minFreeSpace); err != nil {
		return usagef("--min-free-space: %w", err)
	}
	if f.logFormat != "text" && f.logFormat != "json" {
		return usagef("--log-format %q: use text or json", f.logFormat)
	}
	c.logFormat = f.logFormat
	if c.logLevel, err = logging.ParseLevel(f.logLevel); err != nil {
		return usagef("--log-level: %w", err)
	}
	if (f.tlsCert == "") != (f.tlsKey == "") {
		return usagef("--tls-cert and --tls-key go together")
	}
	c.tlsCert, c.tlsKey, c.tokenFile = f.tlsCert, f.tlsKey, f.tokenFile
	if f.shutdownTimeout <= 0 {
		return usagef("--shutdown-timeout must be positive")
	}
	c.shutdown = f.shutdownTimeout
	for _, l := range f.listen {
		for _, s := range splitList(l) {
			u, err := parseListenURL(s)
			if err != nil {
				return usagef("--listen: %w", err)
			}
			if u.tls() && f.tlsCert == "" {
				return usagef("--listen %s: https needs --tls-cert and --tls-key", s)
			}
			c.urls = append(c.urls, u)
		}
	}
	if f.given("listen") && len(c.urls) == 0 {
		return usagef("--listen: no URL given")
	}
	return nil
}

// buildConfig merges the settings file and the flags. cwd resolves
// relative directories, as the reference resolves them against the
// process's working directory.
func buildConfig(f *flags, cwd string) (config, error) {
	var c config
	if err := f.check(&c); err != nil {
		return c, err
	}
	c.metricsNoAuth = f.metricsNoAuth
	s, err := readSettingsFile(f, cwd, &c)
	if err != nil {
		return c, err
	}
	if c.limits, err = buildLimits(f.limits, f.given, s.Limits, c.settingsFile); err != nil {
		return c, err
	}
	dirs := []struct {
		dst       *string
		fromFile  *string
		fromFlag  string
		key, flag string
	}{
		{&c.workingDir, s.Settings.WorkingDirectory, f.workingDir, keyWorkingDirectory, "--working-dir"},
		{&c.originalDir, s.Settings.OriginalImageDirectory, f.originalDir, keyOriginalImageDirectory, "--original-dir"},
		{&c.destinationDir, s.Settings.DestinationDirectory, f.destinationDir, keyDestinationDirectory, "--destination-dir"},
	}
	for _, d := range dirs {
		p, from := d.fromFlag, d.flag
		if p == "" && d.fromFile != nil {
			p, from = *d.fromFile, d.key+" in "+c.settingsFile
		}
		if *d.dst, err = checkDir(cwd, p, d.key, d.flag, from); err != nil {
			return c, err
		}
	}
	if len(c.urls) == 0 { // no --listen: the settings file's Urls, else the default
		if c.urls, err = settingsURLs(s, &c); err != nil {
			return c, err
		}
	}
	return c, nil
}

// readSettingsFile reads appsettings.json (-s, relative to cwd) and notes
// its path in c; the default file may be missing.
func readSettingsFile(f *flags, cwd string, c *config) (appSettings, error) {
	path := f.settings
	if path == "" {
		return appSettings{}, nil
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join(cwd, path)
	}
	s, err := loadSettings(path)
	switch {
	case err == nil:
		c.settingsFile = path
	case !f.given("settings") && errors.Is(err, os.ErrNotExist):
		// The default file is optional.
		return appSettings{}, nil
	}
	return s, err
}

// checkDir makes p (a directory setting named key, given by from)
// absolute and checks that it is a directory.
func checkDir(cwd, p, key, flag, from string) (string, error) {
	if strings.TrimSpace(p) == "" {
		return "", fmt.Errorf("%s is not set: give it in the settings file or with %s", key, flag)
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(cwd, p)
	}
	p = filepath.Clean(p)
	st, err := os.Stat(p)
	switch {
	case err != nil:
		return "", fmt.Errorf("%s (%s): directory %s does not exist or cannot be read: %w (create it or fix the setting)", key, from, p, err)
	case !st.IsDir():
		return "", fmt.Errorf("%s (%s): %s is not a directory", key, from, p)
	}
	return p, nil
}

// settingsURLs are the listen URLs of the settings file's Urls, else the
// default.
func settingsURLs(s appSettings, c *config) ([]listenURL, error) {
	list := defaultURL
	if s.Urls != nil && strings.TrimSpace(*s.Urls) != "" {
		list = *s.Urls
	}
	var urls []listenURL
	for _, raw := range splitList(list) {
		u, err := parseListenURL(raw)
		if err != nil {
			return nil, fmt.Errorf("%s in %s: %w", keyUrls, c.settingsFile, err)
		}
		if u.tls() && c.tlsCert == "" {
			return nil, fmt.Errorf("%s in %s: %s needs a certificate: give --tls-cert and --tls-key", keyUrls, c.settingsFile, raw)
		}
		urls = append(urls, u)
	}
	return urls, nil
}
