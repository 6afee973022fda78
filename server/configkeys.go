package server

// The keys of server.conf, in one table. Everything else about the file
// (DefaultConfig, LoadConfig, Config.String, the startup-only rule on
// reload, the "did you mean" hints and --check-config) works from it, so a
// new key is one line here plus its Config field.

import (
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/dnbd3go/dnbd3go/internal/logging"
)

// configKey is one key of server.conf.
type configKey struct {
	section string // dnbd3, limits or logging
	name    string // as spelled in the file (case-sensitive)
	def     string // default, as server.conf spells it ("" = the zero value)
	// startup keys are read only at start: a reload keeps the running
	// value and warns that a changed one needs a restart. The [logging]
	// keys are among them: the log is set up once.
	startup bool
	// required, if not empty, makes the key mandatory at start and says
	// what to set it to; a reload without it keeps the running value
	// silently.
	required string
	// strict keys stop the server when their value cannot be used,
	// instead of falling back to the default.
	strict bool
	// parse stores value in c. An error leaves c unchanged; a note is a
	// warning about the stored value (clamped, or a log mask that selects
	// nothing).
	parse func(c *Config, value string) (note string, err error)
	// format returns c's value as server.conf spells it.
	format func(c *Config) string
	// copy sets dst's value to src's.
	copy func(dst, src *Config)
}

// kind is how values of type T are read from and written to server.conf.
type kind[T any] struct {
	parse  func(string) (v T, note string, err error)
	format func(T) string
}

// key describes a key whose value lives in the Config field that field
// returns.
func key[T any](section, name, def string, field func(*Config) *T, k kind[T]) configKey {
	return configKey{
		section: section,
		name:    name,
		def:     def,
		parse: func(c *Config, value string) (string, error) {
			v, note, err := k.parse(value)
			if err == nil {
				*field(c) = v
			}
			return note, err
		},
		format: func(c *Config) string { return k.format(*field(c)) },
		copy:   func(dst, src *Config) { *field(dst) = *field(src) },
	}
}

// startupOnly marks k as read at start only.
func (k configKey) startupOnly() configKey { k.startup = true; return k }

// mustBeSet marks k as required at start; how says what to set it to.
func (k configKey) mustBeSet(how string) configKey { k.required = how; return k }

// strictValue marks k as one whose bad value stops the server.
func (k configKey) strictValue() configKey { k.strict = true; return k }

// configKeys is the table of server.conf keys, in the order Config.String
// writes them.
var configKeys = []configKey{
	key("dnbd3", "basePath", "", func(c *Config) *string { return &c.BasePath }, basePathKind).startupOnly().strictValue().
		mustBeSet("set it to the absolute path of the image directory"),
	key("dnbd3", "listenPort", "5003", func(c *Config) *uint16 { return &c.ListenPort }, integer[uint16](intRange{lo: 1, hi: math.MaxUint16})).startupOnly().strictValue(),
	key("dnbd3", "serverPenalty", "0", func(c *Config) *time.Duration { return &c.ServerPenalty }, duration(time.Microsecond, 0)),
	key("dnbd3", "clientPenalty", "0", func(c *Config) *time.Duration { return &c.ClientPenalty }, duration(time.Microsecond, 0)),
	key("dnbd3", "isProxy", "false", func(c *Config) *bool { return &c.IsProxy }, boolean),
	key("dnbd3", "backgroundReplication", "true", func(c *Config) *bgrMode { return &c.BackgroundReplication }, bgrModeKind),
	key("dnbd3", "bgrMinClients", "0", func(c *Config) *int { return &c.BGRMinClients }, integer[int](intRange{lo: 0, hi: math.MaxInt32})),
	key("dnbd3", "bgrWindowSize", "1", func(c *Config) *int { return &c.BGRWindowSize }, integer[int](intRange{lo: 1, hi: maxBGRWindowSize, clampLo: true, clampHi: true})),
	key("dnbd3", "lookupMissingForProxy", "true", func(c *Config) *bool { return &c.LookupMissingForProxy }, boolean),
	key("dnbd3", "sparseFiles", "false", func(c *Config) *bool { return &c.SparseFiles }, boolean),
	key("dnbd3", "ignoreAllocErrors", "false", func(c *Config) *bool { return &c.IgnoreAllocErrors }, boolean),
	key("dnbd3", "removeMissingImages", "true", func(c *Config) *bool { return &c.RemoveMissingImages }, boolean),
	key("dnbd3", "uplinkTimeout", "5000", func(c *Config) *time.Duration { return &c.UplinkTimeout }, duration(time.Millisecond, 1)),
	key("dnbd3", "clientTimeout", "15000", func(c *Config) *time.Duration { return &c.ClientTimeout }, duration(time.Millisecond, 1)),
	key("dnbd3", "closeUnusedFd", "false", func(c *Config) *bool { return &c.CloseUnusedFd }, boolean),
	key("dnbd3", "vmdkLegacyMode", "false", func(c *Config) *bool { return &c.VMDKLegacyMode }, boolean).startupOnly(),
	key("dnbd3", "proxyPrivateOnly", "false", func(c *Config) *bool { return &c.ProxyPrivateOnly }, boolean),
	key("dnbd3", "pretendClient", "false", func(c *Config) *bool { return &c.PretendClient }, boolean),
	key("dnbd3", "autoFreeDiskSpaceDelay", "36000", func(c *Config) *time.Duration { return &c.AutoFreeDiskSpaceDelay }, freeSpaceDelay),
	key("dnbd3", "iScsiServer", "true", func(c *Config) *bool { return &c.ISCSIServer }, boolean),

	key("limits", "maxClients", strconv.Itoa(maxClientsLimit), func(c *Config) *int { return &c.MaxClients }, integer[int](intRange{lo: 1, hi: maxClientsLimit, clampHi: true})).startupOnly(),
	key("limits", "maxImages", strconv.Itoa(maxImagesLimit), func(c *Config) *int { return &c.MaxImages }, integer[int](intRange{lo: 1, hi: maxImagesLimit, clampHi: true})).startupOnly(),
	key("limits", "maxPayload", "9000000", func(c *Config) *int64 { return &c.MaxPayload }, integer[int64](intRange{lo: 1, hi: math.MaxInt64})),
	key("limits", "maxReplicationSize", "100000000000", func(c *Config) *int64 { return &c.MaxReplicationSize }, integer[int64](intRange{lo: 0, hi: math.MaxInt64})),
	key("limits", "maxPrefetch", "262144", func(c *Config) *int64 { return &c.MaxPrefetch }, integer[int64](intRange{lo: 0, hi: math.MaxInt64})),
	key("limits", "minRequestSize", "0", func(c *Config) *int64 { return &c.MinRequestSize }, integer[int64](intRange{lo: 0, hi: math.MaxInt64})),

	key("logging", "file", "", func(c *Config) *string { return &c.LogFile }, text).startupOnly(),
	key("logging", "fileMask", logging.DefaultFileMask.String(), func(c *Config) *logging.Mask { return &c.LogFileMask }, maskKind).startupOnly(),
	key("logging", "consoleMask", logging.DefaultConsoleMask.String(), func(c *Config) *logging.Mask { return &c.LogConsoleMask }, maskKind).startupOnly(),
	key("logging", "consoleTimestamps", "false", func(c *Config) *bool { return &c.ConsoleTimestamps }, boolean).startupOnly(),
}

// findConfigKey returns the key [section] name, or nil.
func findConfigKey(section, name string) *configKey {
	for i := range configKeys {
		if k := &configKeys[i]; k.section == section && k.name == name {
			return k
		}
	}
	return nil
}

// The kinds of values.
var (
	// text is any string, as written.
	text = kind[string]{
		parse:  func(s string) (string, string, error) { return s, "", nil },
		format: func(s string) string { return s },
	}
	// boolean is the reference's boolean (parseBool).
	boolean = kind[bool]{
		parse:  func(s string) (bool, string, error) { return parseBool(s), "", nil },
		format: strconv.FormatBool,
	}
	// basePathKind is an absolute directory, stored without trailing
	// slashes ("/" alone stays "/").
	basePathKind = kind[string]{
		parse: func(s string) (string, string, error) {
			switch {
			case s == "":
				return "", "", badValue("empty: set it to the absolute path of the image directory")
			case !filepath.IsAbs(s):
				return "", "", badValue("not absolute: use a path starting with /")
			}
			if p := strings.TrimRight(s, "/"); p != "" {
				return p, "", nil
			}
			return "/", "", nil
		},
		format: func(s string) string { return s },
	}
	// bgrModeKind is backgroundReplication: true, hashblock, else off.
	bgrModeKind = kind[bgrMode]{
		parse:  func(s string) (bgrMode, string, error) { return parseBGRMode(s), "", nil },
		format: bgrMode.String,
	}
	// maskKind is a log level mask (logging.ParseMask).
	maskKind = kind[logging.Mask]{
		parse: func(s string) (logging.Mask, string, error) {
			m := logging.ParseMask(s)
			return m, maskNote(s, m), nil
		},
		format: logging.Mask.String,
	}
	// freeSpaceDelay is autoFreeDiskSpaceDelay: seconds, any negative
	// value disables deletion (stored and written as -1).
	freeSpaceDelay = kind[time.Duration]{
		parse: func(s string) (time.Duration, string, error) {
			n, err := parseNumber(s)
			switch {
			case err != nil:
				return 0, "", err
			case n < 0:
				return -time.Second, "", nil
			case n > math.MaxInt64/int64(time.Second):
				return 0, "", badValue("too large")
			}
			return time.Duration(n) * time.Second, "", nil
		},
		format: func(d time.Duration) string {
			if d < 0 {
				return "-1"
			}
			return strconv.FormatInt(int64(d/time.Second), 10)
		},
	}
)

// intRange bounds a number: a value outside lo…hi is refused (the default
// stays) or, on a side with clamp set, replaced by that bound.
type intRange struct {
	lo, hi           int64
	clampLo, clampHi bool
}

// check applies the range to n.
func (r intRange) check(n int64) (int64, string, error) {
	switch {
	case n < r.lo && r.clampLo, n > r.hi && r.clampHi:
		c := min(max(n, r.lo), r.hi)
		return c, fmt.Sprintf("outside %d…%d; using %d", r.lo, r.hi, c), nil
	case n < r.lo || n > r.hi:
		return 0, "", badValuef("out of range %d…%d", r.lo, r.hi)
	}
	return n, "", nil
}

// integer is a number with the reference's suffixes (parseNumber) in r.
func integer[T int | int64 | uint16](r intRange) kind[T] {
	return kind[T]{
		parse: func(s string) (T, string, error) {
			n, err := parseNumber(s)
			if err != nil {
				return 0, "", err
			}
			n, note, err := r.check(n)
			return T(n), note, err
		},
		format: func(v T) string { return strconv.FormatInt(int64(v), 10) },
	}
}

// duration is a number of units, at least lo.
func duration(unit time.Duration, lo int64) kind[time.Duration] {
	n := integer[int64](intRange{lo: lo, hi: math.MaxInt64 / int64(unit)})
	return kind[time.Duration]{
		parse: func(s string) (time.Duration, string, error) {
			v, note, err := n.parse(s)
			return time.Duration(v) * unit, note, err
		},
		format: func(d time.Duration) string { return n.format(int64(d / unit)) },
	}
}

// maskNote warns about a log mask that selects no level and about words
// that select none (level words are upper-case and matched as
// substrings, so "error" or "WARN" select nothing).
func maskNote(s string, m logging.Mask) string {
	levels := strings.Fields(logging.MaskAll.String())
	var unknown []string
	var meant logging.Mask
	for _, w := range strings.FieldsFunc(s, func(r rune) bool { return !unicode.IsLetter(r) && !unicode.IsDigit(r) }) {
		if logging.ParseMask(w) != 0 {
			continue
		}
		unknown = append(unknown, w)
		meant |= logging.ParseMask(strings.ToUpper(w))
		for _, l := range levels {
			if strings.HasPrefix(l, strings.ToUpper(w)) {
				meant |= logging.ParseMask(l)
			}
		}
	}
	var note string
	switch {
	case m == 0:
		note = "selects no level, so nothing at all is logged there, not even errors"
	case len(unknown) > 0:
		note = fmt.Sprintf("%s selects no level and is ignored", strings.Join(unknown, " "))
	default:
		return ""
	}
	note += fmt.Sprintf(" (the level words are %s, upper-case)", strings.Join(levels, ", "))
	if meant != 0 {
		note += fmt.Sprintf("; did you mean %s?", (m | meant).String())
	} else if m == 0 {
		note += "; e.g. " + logging.DefaultConsoleMask.String()
	}
	return note
}

// closestConfigKey returns the key name most likely means: the same name
// in other letter case or another section, or one a typo or two away;
// nil if none is close.
func closestConfigKey(name string) *configKey {
	lname := strings.ToLower(name)
	limit := min(2, len(name)/3)
	var best *configKey
	for i := range configKeys {
		k := &configKeys[i]
		if d := editDistance(lname, strings.ToLower(k.name)); d <= limit {
			best, limit = k, d-1
		}
	}
	return best
}

// hint says how [section] name differs from k.
func (k *configKey) hint(section, name string) string {
	h := fmt.Sprintf("did you mean [%s] %s?", k.section, k.name)
	switch {
	case !strings.EqualFold(k.section, section):
		return fmt.Sprintf("%s It belongs below [%s]", h, k.section)
	case k.section != section || strings.EqualFold(k.name, name):
		return "names are case-sensitive: " + h
	}
	return h
}

// editDistance is the Levenshtein distance of a and b (bytes).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			sub := prev[j-1]
			if a[i-1] != b[j-1] {
				sub++
			}
			cur[j] = min(sub, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
