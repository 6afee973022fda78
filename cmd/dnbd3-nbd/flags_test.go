package main

import (
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/version"
)

// TestFlagErrors covers the command-line checks that run before any
// server, kernel module or privilege is needed.
func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"attach", "-i", "img"}, 2, "-h HOSTS and -i IMAGE are required"},
		{[]string{"attach", "-h", "h", "-i", "img", "--block-size", "1024"}, 2, "--block-size 1024"},
		{[]string{"attach", "-h", "h", "-i", "img", "--connections", "0"}, 2, "--connections 0"},
		{[]string{"attach", "-h", "h", "-i", "img", "-c", "a", "-L", "b"}, 2, "exclude each other"},
		{[]string{"attach", "-h", "h", "-i", "img", "--oom-score-adj", "-1001"}, 2, "--oom-score-adj -1001: want -1000 to 1000"},
		{[]string{"attach", "-h", "h", "-i", "img", "--device", "/dev/nbd1p2"}, 2, "is a partition"},
		{[]string{"attach", "-h", "h", "-i", "img", "extra"}, 2, "unexpected argument"},
		{[]string{"serve", "-h", "h", "-i", "img"}, 2, "--listen"},
		{[]string{"serve", "-h", "h", "-i", "img", "-m", "--listen", "unix:x"}, 2, "need a copy-on-write session"},
		{[]string{"serve", "-h", "h", "-i", "img", "--timeout", "-1s", "--listen", "unix:x"}, 2, "--timeout"},
		{[]string{"serve", "-h", "h", "-i", "img", "-c", "d", "--listen", "tcp:127.0.0.1:10809"}, 2, "refusing a writable export (-c/-L) on tcp:127.0.0.1:10809"},
		{[]string{"serve", "-h", "h", "-i", "img", "-L", "d", "--listen", "unix:@abstract"}, 2, "--insecure-writable"},
		{[]string{"serve", "-h", "h", "-i", "img", "--listen", "tcp::10809", "--socket-mode", "0660"}, 2, "--socket-mode applies to unix:PATH"},
		{[]string{"serve", "-h", "h", "-i", "img", "--listen", "unix:x", "--socket-mode", "0999"}, 2, "--socket-mode \"0999\""},
		{[]string{"serve", "-h", "h", "-i", "img", "--listen", "unix:x", "--socket-mode", "01777"}, 2, "from 0001 to 0777"},
		{[]string{"status"}, 2, "exactly one device"},
		{[]string{"status", "--bogus", "/dev/nbd0"}, 2, "dnbd3-nbd status: unknown flag: --bogus"},
		{[]string{"detach", "sda"}, 2, "not an NBD device"},
		{[]string{"detach", "--bogus", "/dev/nbd0"}, 2, "dnbd3-nbd detach: unknown flag: --bogus"},
		{[]string{"resize", "/dev/nbd0", "12Q"}, 2, "dnbd3-nbd resize:"},
		{[]string{"resize", "--bogus", "/dev/nbd0"}, 2, "dnbd3-nbd resize: unknown flag: --bogus"},
		{[]string{"list", "extra"}, 2, "unexpected argument"},
		{[]string{"status", "/nonexistent/x.sock"}, 2, "neither /dev/nbdN nor the socket of a running serve"},
		{[]string{"status", "tcp:127.0.0.1:10809"}, 2, "only an export on a unix socket file"},
		{[]string{"servers"}, 2, "want a device"},
		{[]string{"servers", "/dev/nbd0", "frobnicate", "h"}, 2, `unknown action "frobnicate"`},
		{[]string{"servers", "/dev/nbd0", "add"}, 2, "add wants exactly one HOST"},
		{[]string{"servers", "/dev/nbd0", "add", "a", "b"}, 2, "add wants exactly one HOST"},
		{[]string{"servers", "/dev/nbd0", "auto", "x"}, 2, "auto takes no HOST"},
		{[]string{"servers", "/dev/nbd0", "switch", "10.0.0.1:0"}, 2, "bad port"},
		{[]string{"servers", "/dev/nbd0", "add", "a b"}, 2, "bad server"},
		{[]string{"servers", "/dev/nbd0", "remove", "[::1"}, 2, "bad"},
		{[]string{"images"}, 2, "-h HOST is required"},
		{[]string{"images", "-h", "x:0"}, 2, "bad port"},
		{[]string{"attach", "-h", "h", "-i", "img", "--cowServer", "http://m:1"}, 2, "need a copy-on-write session"},
		{[]string{"attach", "-h", "h", "-i", "img", "--cowStatStdout"}, 2, "need a copy-on-write session"},
		{[]string{"attach", "-h", "h", "-i", "img", "-c", "a", "--loadcow", "b"}, 2, "exclude each other"},
	} {
		code, _, stderr := runT(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d with %q", tc.args, code, stderr, tc.code, tc.msg)
		}
	}
}

// TestCommandHelp checks that every command's help goes to stdout, exits
// 0 and shows its usage line, whether asked as "COMMAND --help" or "help
// COMMAND".
func TestCommandHelp(t *testing.T) {
	for _, c := range commands() {
		for _, args := range [][]string{{c.name, "--help"}, {"help", c.name}} {
			code, stdout, stderr := runT(t, args...)
			if code != 0 || !strings.Contains(stdout, "Usage: dnbd3-nbd "+c.name) || stderr != "" {
				t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
			}
		}
	}
	for _, args := range [][]string{{"--help"}, {"help"}} {
		if code, stdout, _ := runT(t, args...); code != 0 || !strings.Contains(stdout, "Usage: dnbd3-nbd COMMAND") {
			t.Errorf("%v: exit %d, stdout %q", args, code, stdout)
		}
	}
}

// TestVersionFlag: --version and -v print the version on stdout and exit
// 0, at the top and on the commands that take the reference's flags.
func TestVersionFlag(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-v"}, {"version"}, {"attach", "--version"}, {"attach", "-v"}, {"serve", "-v"}, {"get", "--version"}} {
		code, stdout, stderr := runT(t, args...)
		if code != 0 || !strings.Contains(stdout, version.String()) || stderr != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
}

// TestHostFlagWithoutValue: -h is the host flag (as in the reference
// clients); given without a value it points at --help.
func TestHostFlagWithoutValue(t *testing.T) {
	for _, args := range [][]string{{"attach", "-h"}, {"serve", "-h"}, {"get", "-h"}, {"images", "-h"}, {"attach", "--host"},
		{"attach", "-h", "-i", "img"}, {"images", "-h", "--json"}} {
		code, _, stderr := runT(t, args...)
		if code != exitUsage || !strings.Contains(stderr, "-h is the host flag") || !strings.Contains(stderr, "--help for help") {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
}
