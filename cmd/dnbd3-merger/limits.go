package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/dnbd3go/dnbd3go/merger/httpapi"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
)

// limits are the bounds on what clients can make the service hold: every
// one has a flag and a key in the "Limits" section of appsettings.json
// (our own section; the reference has no such settings). A flag given on
// the command line wins over the file.
type limits struct {
	maxUploads          int
	maxUploadsPerClient int
	uploadTimeout       time.Duration
	maxConnections      int
	maxSessions         int
	maxSessionsPerImage int
	maxOpenSessions     int
	sessionQuota        int64 // 0: automatic
	abandonEmptyAfter   time.Duration
}

// Defaults of limits that are the command's own (the others are the
// packages' defaults).
const defaultMaxConnections = 1000

// limitKeySection is the settings section of the limits.
const limitKeySection = "Limits"

// limitDef describes one limit: its flag, its settings key, its default
// (as text), and how a value is parsed into limits.
type limitDef struct {
	flag, key, def, usage string
	parse                 func(l *limits, s string) error
}

// limitDefs are the limits, in the order of --help.
var limitDefs = []limitDef{
	{"max-uploads", "MaxUploads", strconv.Itoa(httpapi.DefaultMaxUploads),
		"uploads received at once, each holding a 1.3 MB buffer (more wait up to 10 s, then 503 + Retry-After)",
		func(l *limits, s string) (err error) { l.maxUploads, err = parseCount(s); return }},
	{"max-uploads-per-client", "MaxUploadsPerClient", strconv.Itoa(httpapi.DefaultMaxUploadsPerClient),
		"uploads at once from one client address (more get 503 + Retry-After); behind a reverse proxy all clients share its address",
		func(l *limits, s string) (err error) { l.maxUploadsPerClient, err = parseCount(s); return }},
	{"upload-timeout", "UploadTimeout", "1m",
		"how long the body of one upload may take to arrive",
		func(l *limits, s string) (err error) { l.uploadTimeout, err = parsePositiveDuration(s); return }},
	{"max-connections", "MaxConnections", strconv.Itoa(defaultMaxConnections),
		"client connections at once (more get 503 and are closed); lowered to fit the descriptor limit",
		func(l *limits, s string) (err error) { l.maxConnections, err = parseCount(s); return }},
	{"max-sessions", "MaxSessions", strconv.Itoa(merger.DefaultMaxSessions),
		"sessions kept, finished ones included until --retention ends (more creates get 503)",
		func(l *limits, s string) (err error) { l.maxSessions, err = parseCount(s); return }},
	{"max-sessions-per-image", "MaxSessionsPerImage", strconv.Itoa(merger.DefaultMaxSessionsPerImage),
		"sessions of one image name, the same way",
		func(l *limits, s string) (err error) { l.maxSessionsPerImage, err = parseCount(s); return }},
	{"max-open-sessions", "MaxOpenSessions", strconv.Itoa(merger.DefaultMaxOpenSessions),
		"sessions with their upload files open at once (2 descriptors each; idle ones are closed); lowered to fit the descriptor limit",
		func(l *limits, s string) (err error) { l.maxOpenSessions, err = parseCount(s); return }},
	{"session-quota", "SessionQuota", "auto",
		"uploads one session may hold (K, M, G, T; each distinct 1.25 MiB cluster counts in full); auto: twice its original image, at least 1G",
		func(l *limits, s string) error {
			if strings.EqualFold(strings.TrimSpace(s), "auto") {
				l.sessionQuota = 0
				return nil
			}
			n, err := units.ParseSize(s)
			if err == nil && n < cowformat.ClusterSize {
				err = fmt.Errorf("%q is less than one cluster (1280K)", s)
			}
			l.sessionQuota = n
			return err
		}},
	{"abandon-empty-after", "AbandonEmptyAfter", "1h",
		"delete sessions that never received an upload after this long (at most --abandon-after)",
		func(l *limits, s string) (err error) { l.abandonEmptyAfter, err = parsePositiveDuration(s); return }},
}

func parseCount(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 {
		return 0, fmt.Errorf("%q is not a whole number of at least 1", s)
	}
	return n, nil
}

func parsePositiveDuration(s string) (time.Duration, error) {
	d, err := parseDuration(s)
	if err == nil && d <= 0 {
		err = fmt.Errorf("bad duration %q: it must be positive", s)
	}
	return d, err
}

// limitFlags holds the limit flags as given.
type limitFlags map[string]*string

// defineLimitFlags adds the limit flags to fs.
func defineLimitFlags(fs *pflag.FlagSet) limitFlags {
	lf := make(limitFlags, len(limitDefs))
	for _, d := range limitDefs {
		lf[d.flag] = fs.String(d.flag, d.def, d.usage+" ("+limitKeySection+"."+d.key+")")
	}
	return lf
}

// buildLimits merges the defaults, the settings file's Limits section
// (section may be nil) and the flags given.
func buildLimits(lf limitFlags, given func(string) bool, section map[string]json.RawMessage, file string) (limits, error) {
	var l limits
	for _, d := range limitDefs {
		if err := d.parse(&l, d.def); err != nil {
			panic("default of --" + d.flag + ": " + err.Error())
		}
	}
	keys := make(map[string]string, len(section)) // lower-case -> as written
	for k := range section {
		keys[strings.ToLower(k)] = k
	}
	for _, d := range limitDefs {
		if given(d.flag) {
			if err := d.parse(&l, *lf[d.flag]); err != nil {
				return l, usagef("--%s: %w", d.flag, err)
			}
			continue
		}
		k, ok := keys[strings.ToLower(d.key)]
		if !ok {
			continue
		}
		v, err := settingText(section[k])
		if err == nil {
			err = d.parse(&l, v)
		}
		if err != nil {
			return l, fmt.Errorf("%s.%s in %s: %w", limitKeySection, k, file, err)
		}
	}
	for _, k := range keys {
		if !slices.ContainsFunc(limitDefs, func(d limitDef) bool { return strings.EqualFold(d.key, k) }) {
			return l, fmt.Errorf("%s.%s in %s: unknown setting (known: %s)", limitKeySection, k, file, limitKeyList())
		}
	}
	return l, nil
}

// settingText returns a JSON number or string as text.
func settingText(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err == nil {
		return n.String(), nil
	}
	return "", fmt.Errorf("%s is neither a number nor a string", raw)
}

func limitKeyList() string {
	var ks []string
	for _, d := range limitDefs {
		ks = append(ks, d.key)
	}
	return strings.Join(ks, ", ")
}

// Descriptor budget: what the service may hold open at once, besides the
// connections and the open sessions.
const (
	fdReserve  = 32 // standard streams, listeners, lock, epoll, logs, directory syncs
	fdPerMerge = 4  // the session's two files, the original and the new revision
	fdPerConn  = 2  // the connection, and a file a request may open meanwhile
	fdPerStore = 2
)

// fitDescriptors lowers maxOpenSessions and maxConnections so that the
// service stays within the descriptor limit nofile (RLIMIT_NOFILE), and
// fails if even small values do not fit. It logs what it lowered.
func fitDescriptors(l *limits, maxMerges int, nofile uint64, log *slog.Logger) error {
	const minStores, minConns = 2, 4
	avail := int64(nofile) - fdReserve - int64(fdPerMerge*maxMerges)
	if avail < fdPerStore*minStores+fdPerConn*minConns {
		return fmt.Errorf("the descriptor limit (RLIMIT_NOFILE) is %d, too low for %d merges and a few connections: raise it (ulimit -n, or LimitNOFILE= in the systemd unit) to at least %d",
			nofile, maxMerges, fdReserve+fdPerMerge*maxMerges+fdPerStore*minStores+fdPerConn*minConns)
	}
	if int64(fdPerStore*l.maxOpenSessions+fdPerConn*l.maxConnections) <= avail {
		return nil
	}
	stores := max(min(int64(l.maxOpenSessions), avail/(4*fdPerStore)), minStores)
	conns := min(int64(l.maxConnections), (avail-fdPerStore*stores)/fdPerConn)
	log.Warn("the descriptor limit is low: lowering the limits to fit (raise it with ulimit -n or LimitNOFILE=)",
		"RLIMIT_NOFILE", nofile, "maxOpenSessions", stores, "maxConnections", conns)
	l.maxOpenSessions, l.maxConnections = int(stores), int(conns)
	return nil
}

// descriptorLimit returns the soft RLIMIT_NOFILE (which the Go runtime
// has already raised to the hard limit).
func descriptorLimit() (uint64, error) {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0, fmt.Errorf("read the descriptor limit: %w", err)
	}
	return r.Cur, nil
}
