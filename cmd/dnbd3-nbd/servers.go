package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

// The runtime server controls of a running attach or serve, like the
// reference kernel client's dnbd3-client -A/-R/-s:
//
//	dnbd3-nbd servers /dev/nbdN|SOCKET                 list the servers
//	dnbd3-nbd servers /dev/nbdN|SOCKET add HOST        add an alternative server
//	dnbd3-nbd servers /dev/nbdN|SOCKET remove HOST     forget one (fails over if current)
//	dnbd3-nbd servers /dev/nbdN|SOCKET switch HOST     use HOST now and stay on it
//	dnbd3-nbd servers /dev/nbdN|SOCKET auto            let RTT probing choose again

// serverActions maps the command's actions to control operations.
var serverActions = map[string]string{
	"add":    "add-server",
	"remove": "remove-server",
	"switch": "switch-server",
	"auto":   "unpin",
}

// serverChange is the result of a server operation on the control socket.
type serverChange struct {
	Op      string   `json:"op"`
	Servers []string `json:"servers,omitempty"` // added, removed or switched to
	Current string   `json:"current"`
	Pinned  string   `json:"pinned,omitempty"`
}

// serverControl answers the server operations for img; moved is called
// after a switch or a removal of the current server, so that the device's
// kernel-direct connections follow at once (nil: nothing to move). ok is
// false for other operations. The client checks req.Server
// (client.ParseServerSpec) before it resolves anything.
func serverControl(ctx context.Context, img *client.Image, req nbdbridge.ControlRequest, moved func()) (v any, ok bool, err error) {
	switch req.Op {
	case "add-server", "remove-server", "switch-server", "unpin":
	default:
		return nil, false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	before := img.Current()
	res := serverChange{Op: req.Op}
	switch req.Op {
	case "add-server":
		res.Servers, err = img.AddServer(ctx, req.Server)
	case "remove-server":
		res.Servers, err = img.RemoveServer(ctx, req.Server)
	case "switch-server":
		var s string
		if s, err = img.SwitchServer(ctx, req.Server); err == nil {
			res.Servers = []string{s}
		}
	case "unpin":
		img.Unpin()
	}
	st := img.Stats()
	res.Current, res.Pinned = st.Current, st.Pinned
	if err == nil && moved != nil && (req.Op == "switch-server" || before != res.Current) {
		moved()
	}
	return res, true, err
}

func runServers(ctx context.Context, args []string, s stdio) int {
	fs := pflag.NewFlagSet("dnbd3-nbd servers", pflag.ContinueOnError)
	fs.SetOutput(s.err)
	setHelp(fs, s, "Usage: dnbd3-nbd servers /dev/nbdN|SOCKET [add HOST | remove HOST | switch HOST | auto]\n\n"+
		"Lists or changes the servers of an attached device (or of a `serve` export, by its unix socket\n"+
		"path), as the reference kernel client's -A, -R and -s do. HOST is one host[:port] (default port 5003).\n"+
		"  add     add an alternative server (failover and RTT probing consider it; at most 16 servers)\n"+
		"  remove  forget a server (also one learned from the servers); if it is the current one, reads\n"+
		"          move to another at once\n"+
		"  switch  connect to HOST and read from it from now on (kernel-direct connections move too);\n"+
		"          RTT probing keeps off until HOST fails or `auto`\n"+
		"  auto    let RTT probing choose the server again\n")
	if code, ok := parseFlagArgs(fs, args, s, "servers"); !ok {
		return code
	}
	a := fs.Args()
	bad := func(format string, v ...any) int {
		fmt.Fprintf(s.err, "dnbd3-nbd servers: "+format+"\n", v...)
		return exitUsage
	}
	if len(a) == 0 {
		return bad("want a device (/dev/nbdN) or a serve socket, see --help")
	}
	target, err := newControlTarget(a[0])
	if err != nil {
		return bad("%v", err)
	}
	if len(a) == 1 {
		var st attachStatus
		if err := target.query(&st); err != nil {
			return exitWith(s, "servers", err)
		}
		printServers(s.out, st.Client)
		return exitOK
	}
	op, ok := serverActions[a[1]]
	switch {
	case !ok:
		return bad("unknown action %q: want add, remove, switch or auto", a[1])
	case op == "unpin" && len(a) != 2:
		return bad("auto takes no HOST")
	case op != "unpin" && len(a) != 3:
		return bad("%s wants exactly one HOST", a[1])
	}
	req := nbdbridge.ControlRequest{Op: op}
	if op != "unpin" {
		req.Server = a[2]
		if _, _, err := client.ParseServerSpec(req.Server); err != nil {
			return bad("%v", err)
		}
	}
	var res serverChange
	if err := target.control(req, &res, 20*time.Second); err != nil {
		return exitWith(s, "servers", err)
	}
	printChange(s.out, a[1], res)
	return exitOK
}

// printChange reports the result of a server operation.
func printChange(w io.Writer, action string, res serverChange) {
	switch {
	case action == "auto":
		fmt.Fprintf(w, "RTT probing chooses the server again (current: %s)\n", orDash(res.Current))
	case len(res.Servers) == 0 && action == "add":
		fmt.Fprintf(w, "already known (current: %s)\n", orDash(res.Current))
	default:
		for _, srv := range res.Servers {
			fmt.Fprintf(w, "%s: %s\n", map[string]string{"add": "added", "remove": "removed", "switch": "switched to"}[action], srv)
		}
		fmt.Fprintf(w, "current: %s\n", orDash(res.Current))
	}
}

// printServers prints the server table of a status.
func printServers(w io.Writer, c client.Stats) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tORIGIN\tRTT\tFAILURES\tSTATE")
	for _, sv := range c.Servers {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", sv.Addr, serverOrigin(sv), rttText(sv.RTT), sv.Failures, serverState(sv))
	}
	tw.Flush()
}

func serverOrigin(sv client.ServerStats) string {
	switch {
	case sv.Added:
		return "added"
	case sv.Learned:
		return "learned"
	}
	return "given"
}

func serverState(sv client.ServerStats) string {
	switch {
	case sv.Active && sv.Pinned:
		return "current (pinned)"
	case sv.Active:
		return "current"
	case sv.Pinned:
		return "pinned"
	}
	return "-"
}

func rttText(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return d.Round(time.Microsecond).String()
}
