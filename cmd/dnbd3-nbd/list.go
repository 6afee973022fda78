package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

// deviceInfo is everything list and status know about one device.
type deviceInfo struct {
	index     int
	path      string
	connected bool
	backendID string
	state     nbdbridge.State
	hasState  bool
	live      *attachStatus // from the daemon's control socket
}

// ours reports whether a dnbd3-nbd attach created the device.
func (d deviceInfo) ours() bool {
	return strings.HasPrefix(d.backendID, "dnbd3go:") || d.hasState
}

func (d deviceInfo) stateWord() string {
	switch {
	case d.live != nil:
		return d.live.State
	case d.connected && d.hasState:
		return "orphaned (daemon gone; restart attach to take it over)"
	case d.connected:
		return "connected"
	default:
		return "disconnected"
	}
}

// inspect asks the kernel whether device index is connected and describes it.
func inspect(index int) (deviceInfo, error) {
	st, err := nbdbridge.Status(index)
	if err != nil {
		return deviceInfo{index: index, path: nbdbridge.DevicePath(index)}, err
	}
	connected := false
	for _, s := range st {
		if s.Index == index {
			connected = s.Connected
		}
	}
	return describe(index, connected), nil
}

// describe collects what sysfs, the state file and a live daemon tell
// about device index.
func describe(index int, connected bool) deviceInfo {
	d := deviceInfo{index: index, path: nbdbridge.DevicePath(index), connected: connected}
	d.backendID, _ = nbdbridge.DeviceBackend(index)
	if s, err := nbdbridge.ReadState(index); err == nil {
		d.state, d.hasState = s, true
	}
	var live attachStatus
	if nbdbridge.QueryControl(index, &live) == nil {
		d.live = &live
	}
	return d
}

func runList(ctx context.Context, args []string, s stdio) int {
	var all bool
	fs := pflag.NewFlagSet("dnbd3-nbd list", pflag.ContinueOnError)
	fs.SetOutput(s.err)
	fs.BoolVarP(&all, "all", "a", false, "also show connected NBD devices that dnbd3-nbd did not attach")
	setHelp(fs, s, "Usage: dnbd3-nbd list [-a]\n\nLists the attached devices: device, image, rid, current server and RTT, connections, state.\n")
	if code, ok := parseFlags(fs, args, s, "list"); !ok {
		return code
	}
	if err := nbdbridge.Available(); err != nil {
		return exitWith(s, "list", err)
	}
	st, err := nbdbridge.Status(-1)
	if err != nil {
		return exitWith(s, "list", err)
	}
	tw := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tIMAGE\tRID\tSERVER\tRTT\tCONNS\tSTATE")
	for _, e := range st {
		if !e.Connected {
			continue
		}
		d := describe(e.Index, true)
		if !d.ours() && !all {
			continue
		}
		image, rid, server, rtt, conns := "-", "-", "-", "-", "-"
		if d.hasState {
			image, rid = d.state.Info["image"], d.state.Info["rid"]
			conns = fmt.Sprint(d.state.Connections)
		}
		if d.live != nil {
			image, rid = d.live.Image, fmt.Sprint(d.live.RID)
			server = d.live.Client.Current
			if server == "" {
				server = "(none)"
			} else if d.live.Client.Pinned == server {
				server += " (pinned)"
			}
			rtt = d.live.Client.CurrentRTT.Round(time.Microsecond).String()
			conns = fmt.Sprint(d.live.Connections)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.path, image, rid, server, rtt, conns, d.stateWord())
	}
	tw.Flush()
	return exitOK
}

func runStatus(ctx context.Context, args []string, s stdio) int {
	var asJSON bool
	fs := pflag.NewFlagSet("dnbd3-nbd status", pflag.ContinueOnError)
	fs.SetOutput(s.err)
	fs.BoolVar(&asJSON, "json", false, "print the daemon's full status as JSON")
	setHelp(fs, s, "Usage: dnbd3-nbd status /dev/nbdN|SOCKET [--json]\n\nShows one device: its kernel state and, while its daemon runs, image, servers and I/O counters.\n"+
		"Given the unix socket of a `dnbd3-nbd serve` export (PATH or unix:PATH), shows that export.\n"+
		"Exit code 0 if the device is connected (the export answers), 3 if not.\n")
	if code, ok := parseFlagArgs(fs, args, s, "status"); !ok {
		return code
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(s.err, "dnbd3-nbd status: want exactly one device, e.g. /dev/nbd0, or a serve socket")
		return exitUsage
	}
	target, err := newControlTarget(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd status: %v\n", err)
		return exitUsage
	}
	if !target.isDevice() {
		return exportStatusCmd(target, asJSON, s)
	}
	if err := nbdbridge.Available(); err != nil {
		return exitWith(s, "status", err)
	}
	d, err := inspect(target.device)
	if err != nil {
		return exitWith(s, "status", err)
	}
	if asJSON && d.live != nil {
		printJSON(s.out, d.live)
	} else {
		fmt.Fprintf(s.out, "device:     %s\nconnected:  %v\nstate:      %s\nbackend:    %s\n", d.path, d.connected, d.stateWord(), orDash(d.backendID))
		if d.live != nil {
			printLive(s.out, d.live)
		} else if d.hasState {
			fmt.Fprintf(s.out, "image:      %s rid %s (recorded by pid %d, which is gone)\n", d.state.Info["image"], d.state.Info["rid"], d.state.PID)
		}
	}
	if !d.connected {
		return 3
	}
	return exitOK
}

// exportStatusCmd is status for a serve export.
func exportStatusCmd(target controlTarget, asJSON bool, s stdio) int {
	var st attachStatus
	if err := target.query(&st); err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd status: %v\n", err)
		return 3
	}
	if asJSON {
		printJSON(s.out, &st)
		return exitOK
	}
	fmt.Fprintf(s.out, "export:     %s\nstate:      %s\n", st.Listen, st.State)
	printLive(s.out, &st)
	return exitOK
}

func printJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// printLive prints what a running daemon reports.
func printLive(w io.Writer, l *attachStatus) {
	fmt.Fprintf(w, "pid:        %d\nimage:      %s rid %d (%d bytes, block size %d)\nserver:     %s (rtt %v)%s\nconnections:%d\nstarted:    %s\n",
		l.PID, l.Image, l.RID, l.Size, l.BlockSize, orDash(l.Client.Current), l.Client.CurrentRTT, pinnedNote(l.Client), l.Connections, l.Started.Format(time.RFC3339))
	for _, sv := range l.Client.Servers {
		fmt.Fprintf(w, "  server %-24s %-8s rtt %-10v failures %-4d %s\n", sv.Addr, serverOrigin(sv), rttText(sv.RTT), sv.Failures, serverState(sv))
	}
	if l.Slots.Direct > 0 {
		fmt.Fprintf(w, "kernel:     %s, %d direct to %s, %d relay\n", l.Slots.Mode, l.Slots.Direct, directOn(l.Slots.DirectOn), l.Slots.Relay)
	}
	e := l.Engine
	fmt.Fprintf(w, "io:         %d reads, %d writes, %d flushes, %d errors\n", e.Reads, e.Writes, e.Flushes, e.Errors)
}

// pinnedNote marks a server chosen with `servers switch`.
func pinnedNote(c client.Stats) string {
	if c.Pinned != "" && c.Pinned == c.Current {
		return ", pinned by `servers switch`"
	}
	return ""
}

// directOn lists the servers of the direct slots, sorted.
func directOn(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k, n := range m {
		keys = append(keys, fmt.Sprintf("%s×%d", k, n))
	}
	sort.Strings(keys)
	return strings.Join(keys, " ")
}

func runDetach(ctx context.Context, args []string, s stdio) int {
	var force bool
	fs := pflag.NewFlagSet("dnbd3-nbd detach", pflag.ContinueOnError)
	fs.SetOutput(s.err)
	fs.BoolVar(&force, "force", false, "disconnect even if the device is mounted or open (I/O on it then fails)")
	setHelp(fs, s, "Usage: dnbd3-nbd detach /dev/nbdN [--force]\n\nDisconnects the device; its daemon (if running) exits.\n")
	if code, ok := parseFlagArgs(fs, args, s, "detach"); !ok {
		return code
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(s.err, "dnbd3-nbd detach: want exactly one device, e.g. /dev/nbd0")
		return exitUsage
	}
	index, err := nbdbridge.ParseDevice(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd detach: %v\n", err)
		return exitUsage
	}
	if err := nbdbridge.Available(); err != nil {
		return exitWith(s, "detach", err)
	}
	d, err := inspect(index)
	if err != nil {
		return exitWith(s, "detach", err)
	}
	if !d.connected {
		return exitWith(s, "detach", fmt.Errorf("%s is not connected", d.path))
	}
	if !force {
		if busy, err := nbdbridge.InUse(index); err != nil || busy {
			return exitWith(s, "detach", fmt.Errorf("%s is in use (mounted or open); unmount it first, or use --force", d.path))
		}
	}
	if err := nbdbridge.Disconnect(index); err != nil {
		return exitWith(s, "detach", err)
	}
	// Wait for the daemon (if any) to notice and clean up.
	deadline := time.Now().Add(10 * time.Second)
	for nbdbridge.Held(index) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !nbdbridge.Held(index) {
		nbdbridge.RemoveState(index)
	}
	fmt.Fprintf(s.out, "%s detached\n", d.path)
	return exitOK
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
