package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/spf13/pflag"
)

// setHelp makes --help print text and then the flags to stdout (help is
// output the user asked for, not an error).
func setHelp(fs *pflag.FlagSet, s stdio, text string) {
	fs.Usage = func() {
		io.WriteString(s.out, text)
		if fs.HasAvailableFlags() {
			io.WriteString(s.out, "\nFlags:\n"+fs.FlagUsages())
		}
	}
}

// addVersionFlag registers -v/--version (as the reference clients have);
// parseFlagArgs prints the version when it is set.
func addVersionFlag(fs *pflag.FlagSet) {
	fs.BoolP("version", "v", false, "print the version and exit")
}

// referenceAliases accepts the reference FUSE client's long flag names
// (and the names its cowDoc readme uses) for ours: docs/compat.md lists
// them.
func referenceAliases(_ *pflag.FlagSet, name string) pflag.NormalizedName {
	switch name {
	case "loadcow":
		name = "cow-load"
	case "cowServer":
		name = "merger"
	case "cowStatStdout":
		name = "cow-stats-stdout"
	case "cowStatFile":
		name = "cow-stats-file"
	}
	return pflag.NormalizedName(name)
}

// parseFlagArgs parses args and leaves the positional arguments to the
// caller; ok is false when the command should return code (0 after
// --help or --version).
func parseFlagArgs(fs *pflag.FlagSet, args []string, s stdio, name string) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK, false
		}
		fmt.Fprintf(s.err, "dnbd3-nbd %s: %v%s\n", name, err, hostHint(fs, err.Error()))
		return exitUsage, false
	}
	if v, err := fs.GetBool("version"); err == nil && v {
		fmt.Fprintln(s.out, version.String())
		return exitOK, false
	}
	if h := fs.Lookup("host"); h != nil && h.Shorthand == "h" && strings.HasPrefix(h.Value.String(), "-") {
		fmt.Fprintf(s.err, "dnbd3-nbd %s: -h %q: -h is the host flag and wants servers (\"HOST[:PORT] ...\"); --help for help\n", name, h.Value.String())
		return exitUsage, false
	}
	return 0, true
}

// hostHint explains a missing value of -h, which is the host flag as in
// the reference clients, not help.
func hostHint(fs *pflag.FlagSet, msg string) string {
	h := fs.Lookup("host")
	if h == nil || h.Shorthand != "h" {
		return ""
	}
	if strings.Contains(msg, "'h' in -") || strings.HasSuffix(msg, "argument: --host") {
		return " (-h is the host flag: -h \"HOST[:PORT] ...\"; --help for help)"
	}
	return ""
}
