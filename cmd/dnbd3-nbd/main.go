// Command dnbd3-nbd is the dnbd3go client: it reads DNBD3 images and
// exposes them through the kernel's NBD driver.
//
//	dnbd3-nbd attach -h "HOST[:PORT] ..." -i IMAGE [-r RID] [--device /dev/nbdN] ...
//	dnbd3-nbd detach /dev/nbdN
//	dnbd3-nbd list
//	dnbd3-nbd status /dev/nbdN|SOCKET
//	dnbd3-nbd servers /dev/nbdN|SOCKET [add|remove|switch HOST | auto]
//	dnbd3-nbd images -h HOST[:PORT]
//	dnbd3-nbd serve -h "HOST[:PORT] ..." -i IMAGE --listen unix:PATH|tcp:ADDR
//	dnbd3-nbd get -h "HOST[:PORT] ..." -i IMAGE [-r RID] [-o FILE|-]
//
// Each subcommand lives in its own file and is one line in commands().
// Note that -h is the host flag (as in the reference clients); help is
// --help or "dnbd3-nbd help [COMMAND]".
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1 // the command failed
	exitUsage = 2 // bad command line
)

// stdio is where a command reads and writes; tests pass buffers.
type stdio struct {
	in  io.Reader
	out io.Writer
	err io.Writer
}

// command is one subcommand.
type command struct {
	name    string
	usage   string // arguments, for the overview
	summary string
	run     func(ctx context.Context, args []string, s stdio) int
}

// commands lists the subcommands in the order help shows them.
func commands() []command {
	return []command{
		{"attach", `-h "HOST[:PORT] ..." -i IMAGE [-r RID] [--device /dev/nbdN] [--connections N] [--block-size 512|4096] [-S] [-l LOG]`, "attach an image as /dev/nbdX and serve it in the foreground", runAttach},
		{"detach", `/dev/nbdN [--force]`, "disconnect a device", runDetach},
		{"list", `[-a]`, "list attached devices", runList},
		{"status", `/dev/nbdN|SOCKET [--json]`, "show one device, or a serve export by its socket", runStatus},
		{"resize", `/dev/nbdN SIZE`, "change the size of a copy-on-write device", runResize},
		{"serve", `-h "HOST[:PORT] ..." -i IMAGE [-r RID] --listen unix:PATH|tcp:ADDR`, "export an image over the NBD protocol (QEMU, nbdcopy) without the kernel", runServe},
		{"get", `-h "HOST[:PORT] ..." -i IMAGE [-r RID] [-o FILE|-]`, "download an image or a range of it", runGet},
		{"images", `-h HOST[:PORT] [--json]`, "list the images of a server (from its RPC)", runImages},
		{"servers", `/dev/nbdN|SOCKET [add HOST | remove HOST | switch HOST | auto]`, "list or change the servers of a running attach or serve", runServers},
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "attach" {
		// First of all, before the runtime's threads matter: re-executes
		// so that every thread of the daemon is an I/O flusher. A failure
		// is logged by attach (nbdbridge.ProtectDaemon).
		_ = nbdbridge.ReexecAsIOFlusher()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], stdio{os.Stdin, os.Stdout, os.Stderr})
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and returns the exit code.
func run(ctx context.Context, args []string, s stdio) int {
	if len(args) == 0 {
		usage(s.err)
		return exitUsage
	}
	name := args[0]
	switch name {
	case "help", "--help", "-help", "-H":
		if len(args) > 1 && name == "help" {
			if c, ok := lookup(args[1]); ok {
				return c.run(ctx, []string{"--help"}, s)
			}
			fmt.Fprintf(s.err, "dnbd3-nbd: unknown command %q\n", args[1])
			return exitUsage
		}
		usage(s.out)
		return exitOK
	case "version", "--version", "-V", "-v":
		fmt.Fprintln(s.out, version.String())
		return exitOK
	}
	c, ok := lookup(name)
	if !ok {
		fmt.Fprintf(s.err, "dnbd3-nbd: unknown command %q (try dnbd3-nbd --help)\n", name)
		return exitUsage
	}
	return c.run(ctx, args[1:], s)
}

func lookup(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

func usage(w io.Writer) {
	var b strings.Builder
	b.WriteString("Usage: dnbd3-nbd COMMAND [FLAGS]\n\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(&b, "  %-8s %s\n           %s\n", c.name, c.summary, "dnbd3-nbd "+c.name+" "+c.usage)
	}
	b.WriteString("\nRun \"dnbd3-nbd COMMAND --help\" for a command's flags (-h is the host flag, not help).\n")
	io.WriteString(w, b.String())
}
