package server

// Checking a configuration directory: every problem of server.conf,
// alt-servers and rpc.acl, and of what they point to (basePath, the log
// file), with file and line. `dnbd3-server --check-config` prints them;
// a start runs the same checks and refuses to serve with errors.

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Severity says whether a configuration problem stops the server.
type Severity uint8

// Severities.
const (
	// SeverityWarning: the server starts, but the admin should look.
	severityWarning Severity = iota
	// SeverityError: the server does not start.
	SeverityError
)

// String returns "warning" or "error".
func (s Severity) String() string {
	if s == SeverityError {
		return "error"
	}
	return "warning"
}

// Problem is one finding about the configuration directory.
type Problem struct {
	Severity Severity
	// File is the file the problem is in or about ("" if none).
	File string
	// Line is the 1-based line in File, or 0 for the file as a whole.
	Line int
	// Msg says what is wrong and what to do about it.
	Msg string
}

// Where returns "file:line", "file" or "".
func (p Problem) Where() string {
	if p.Line > 0 {
		return fmt.Sprintf("%s:%d", p.File, p.Line)
	}
	return p.File
}

// String formats p as "file:line: severity: message".
func (p Problem) String() string {
	if w := p.Where(); w != "" {
		return w + ": " + p.Severity.String() + ": " + p.Msg
	}
	return p.Severity.String() + ": " + p.Msg
}

// text is p as a log line or a LoadConfig warning: "file:line: message".
func (p Problem) text() string {
	if w := p.Where(); w != "" {
		return w + ": " + p.Msg
	}
	return p.Msg
}

// lineWarnings formats the line-numbered problems of a file parser as
// LoadACL and LoadAltServers return them: "path: line N: message".
func lineWarnings(path string, probs []Problem) []string {
	var out []string
	for _, p := range probs {
		w := fmt.Sprintf("line %d: %s", p.Line, p.Msg)
		if path != "" {
			w = path + ": " + w
		}
		out = append(out, w)
	}
	return out
}

// problemsError joins the errors among probs into one error, or nil.
func problemsError(probs []Problem) error {
	var errs []string
	for _, p := range probs {
		if p.Severity == SeverityError {
			errs = append(errs, p.text())
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return errors.New(strings.Join(errs, "\n"))
}

// CheckOptions relaxes checks that an admin may override.
type CheckOptions struct {
	// AllowOpenRPC accepts an rpc.acl whose rule lines are all invalid
	// (the RPC is then open to everyone, as without the file, which is
	// what the reference does): a warning instead of an error.
	AllowOpenRPC bool
}

// ConfigDir is a configuration directory as the server reads it at start:
// server.conf, alt-servers and rpc.acl, and every problem found in them
// and in what they point to.
type ConfigDir struct {
	// Dir is the directory (-c).
	Dir string
	// Config is server.conf on top of the defaults (the zero Config if
	// the file could not be read).
	Config Config
	// AltServers is the alt-servers file (nil without one).
	AltServers []*altServer
	// ACL is rpc.acl (allowing everything without the file; never nil).
	ACL *ACL
	// Problems lists everything found, file by file, in line order.
	Problems []Problem
}

// Err returns an error listing the problems of severity error, or nil if
// the server can start with this directory.
func (d *ConfigDir) Err() error { return problemsError(d.Problems) }

// ReadConfigDir reads the configuration directory dir and checks it: the
// syntax and values of the three files, basePath (it must be a readable
// directory, writable for a proxy), the log file, an rpc.acl without a
// valid rule, a proxy without uplinks. It never fails: whatever it cannot
// read is a problem in the result.
func ReadConfigDir(dir string, opts CheckOptions) *ConfigDir {
	cf := readConfig(dir, nil)
	d := &ConfigDir{Dir: dir, Config: cf.cfg, Problems: cf.problems}
	d.readAux()
	d.check(opts, cf.line)
	files := []string{cf.path, filepath.Join(dir, altServersFileName), filepath.Join(dir, aclFileName)}
	rank := func(p Problem) int {
		if i := slices.Index(files, p.File); i >= 0 {
			return i
		}
		return len(files)
	}
	slices.SortStableFunc(d.Problems, func(a, b Problem) int {
		return cmp.Or(cmp.Compare(rank(a), rank(b)), cmp.Compare(lineOrder(a.Line), lineOrder(b.Line)))
	})
	return d
}

// lineOrder sorts whole-file problems (line 0) after the numbered lines.
func lineOrder(line int) int {
	if line == 0 {
		return math.MaxInt
	}
	return line
}

// readAux reads alt-servers and rpc.acl. A file that cannot be read is an
// error (the server would not start), not the same as no file.
func (d *ConfigDir) readAux() {
	if d.Dir == "" { // an embedded server with no configuration files
		d.ACL = &ACL{}
		return
	}
	add := func(path string, probs []Problem, err error) {
		for _, p := range probs {
			p.File = path
			d.Problems = append(d.Problems, p)
		}
		if err != nil {
			d.Problems = append(d.Problems, Problem{Severity: SeverityError, File: path, Msg: err.Error()})
		}
	}
	path := filepath.Join(d.Dir, altServersFileName)
	alts, probs, err := readAltServers(path)
	d.AltServers = alts
	add(path, probs, err)
	path = filepath.Join(d.Dir, aclFileName)
	acl, probs, err := readACL(path)
	if acl == nil {
		acl = &ACL{}
	}
	d.ACL = acl
	add(path, probs, err)
}

// check adds the problems of what the files point to. line returns the
// server.conf line of a key (0 if unknown or absent).
func (d *ConfigDir) check(opts CheckOptions, line func(section, name string) int) {
	c := &d.Config
	conf := filepath.Join(d.Dir, configFileName)
	add := func(sev Severity, file string, line int, format string, args ...any) {
		d.Problems = append(d.Problems, Problem{Severity: sev, File: file, Line: line, Msg: fmt.Sprintf(format, args...)})
	}
	if filepath.IsAbs(c.BasePath) {
		if sev, msg := checkBasePath(c); msg != "" {
			add(sev, conf, line("dnbd3", "basePath"), "%s", msg)
		}
	}
	if c.LogFile != "" {
		if err := checkLogFile(c.LogFile); err != nil {
			add(SeverityError, conf, line("logging", "file"), "[logging] file=%s cannot be written: %v; the server opens it at start: create its directory, fix the permissions or remove the line", c.LogFile, err)
		}
	}
	aclPath := filepath.Join(d.Dir, aclFileName)
	if d.ACL.openByMistake() {
		if opts.AllowOpenRPC {
			add(severityWarning, aclPath, 0, "no line is a valid rule, so the RPC is open to everyone (as without the file), allowed by --allow-open-rpc")
		} else {
			add(SeverityError, aclPath, 0, "no line is a valid rule, so the RPC would be open to everyone (as without the file): fix the lines warned about, empty the file to allow everyone, or start with --allow-open-rpc")
		}
	}
	if c.IsProxy && !hasUplink(d.AltServers, c.ProxyPrivateOnly) {
		which := "entries without for=client"
		if c.ProxyPrivateOnly {
			which = "entries with for=replication (proxyPrivateOnly=true)"
		}
		add(severityWarning, filepath.Join(d.Dir, altServersFileName), 0,
			"isProxy=true, but no alt server may be used as an uplink (only %s are): the proxy cannot fetch images it does not have; add an upstream server", which)
	}
}

// checkBasePath checks that basePath is a readable directory (writable
// for a proxy) and, on a server that is no proxy, that it holds at least
// one image. It returns the problem, if any.
func checkBasePath(c *Config) (Severity, string) {
	base := c.BasePath
	st, err := os.Stat(base)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return SeverityError, fmt.Sprintf("basePath %s does not exist: create it (mkdir -p %s) or correct basePath", base, base)
	case err != nil:
		return SeverityError, fmt.Sprintf("cannot access basePath: %v: fix the permissions of its parent directories for the server's user", err)
	case !st.IsDir():
		return SeverityError, fmt.Sprintf("basePath %s is a file, not a directory: set basePath to the directory that holds the images", base)
	}
	if err := unix.Access(base, unix.R_OK|unix.X_OK); err != nil {
		return SeverityError, fmt.Sprintf("basePath %s cannot be read: %v: the server could not find or open its images; let the server's user read it", base, err)
	}
	if c.IsProxy {
		if err := writable(base); err != nil {
			return SeverityError, fmt.Sprintf("basePath %s is not writable (%v), but a proxy (isProxy=true) stores the images it replicates there: make it writable for the server's user, or set isProxy=false", base, err)
		}
		return 0, ""
	}
	if !holdsImage(base, c.VMDKLegacyMode) {
		return severityWarning, fmt.Sprintf("basePath %s holds no image (files named <name>.r<rid>, e.g. win11.r1): the server serves nothing until some appear", base)
	}
	return 0, ""
}

// writable reports why the server cannot create files in dir, or nil.
func writable(dir string) error {
	return unix.Access(dir, unix.W_OK|unix.X_OK)
}

// copyWritable reports why a proxy cannot write the image file at path or
// create its sidecars, or nil.
func copyWritable(path string) error {
	if err := unix.Access(path, unix.W_OK); err != nil {
		return err
	}
	return writable(filepath.Dir(path))
}

// holdsImage reports whether there is an image file below base, walking
// only until it finds the first.
func holdsImage(base string, legacy bool) bool {
	root := base
	if r, err := filepath.EvalSymlinks(base); err == nil {
		root = r
	}
	found := false
	filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil || path == root || e.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		if _, _, ok, _ := parseImageFileName(rel, legacy); ok {
			found = true
			return fs.SkipAll
		}
		return nil
	})
	return found
}

// checkLogFile reports why the log file at path cannot be opened for
// appending, without creating it.
func checkLogFile(path string) error {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		dir := filepath.Dir(path)
		if _, err := os.Stat(dir); err != nil {
			return err
		}
		return writable(dir)
	case err != nil:
		return err
	case st.IsDir():
		return badValuef("%s is a directory", path)
	}
	return unix.Access(path, unix.W_OK)
}

// hasUplink reports whether a proxy may use one of alts as uplink.
func hasUplink(alts []*altServer, privateOnly bool) bool {
	for _, a := range alts {
		if !a.ClientOnly && (a.Private || !privateOnly) {
			return true
		}
	}
	return false
}
