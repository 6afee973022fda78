package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

// controlTarget is the daemon a command talks to: the attach serving a
// device (its control socket in the run directory) or a serve export (the
// control socket beside its unix socket).
type controlTarget struct {
	device int    // -1 for a serve export
	path   string // the serve export's control socket
	name   string // as the user gave it, for messages
}

// serveControlSuffix names a serve export's control socket: the export's
// socket path plus this.
const serveControlSuffix = ".ctl"

// serveControlPath returns the control socket of the export listening on
// listen, "" if it has none (tcp: and abstract unix:@ exports).
func serveControlPath(listen string) string {
	p, ok := strings.CutPrefix(listen, "unix:")
	if !ok || p == "" || strings.HasPrefix(p, "@") {
		return ""
	}
	return p + serveControlSuffix
}

// newControlTarget parses a command's target argument: /dev/nbdN (or
// nbdN), or the unix socket of a serve export (PATH or unix:PATH).
func newControlTarget(arg string) (controlTarget, error) {
	if strings.HasPrefix(arg, "tcp:") || strings.HasPrefix(arg, "unix:@") {
		return controlTarget{}, fmt.Errorf("%s: only an export on a unix socket file has a control socket (see dnbd3-nbd serve --help)", arg)
	}
	index, derr := nbdbridge.ParseDevice(arg)
	if derr == nil {
		return controlTarget{device: index, name: nbdbridge.DevicePath(index)}, nil
	}
	p, isUnix := strings.CutPrefix(arg, "unix:")
	fi, err := os.Stat(p)
	switch {
	case strings.HasPrefix(arg, "/dev/") || err != nil && !isUnix && !strings.Contains(arg, "/"):
		return controlTarget{}, derr // meant as a device
	case err != nil:
		return controlTarget{}, fmt.Errorf("%s: neither /dev/nbdN nor the socket of a running serve: %w", arg, err)
	case fi.Mode()&os.ModeSocket == 0:
		return controlTarget{}, fmt.Errorf("%s is not a socket: want /dev/nbdN or the socket of a running serve", arg)
	}
	return controlTarget{device: -1, path: p + serveControlSuffix, name: p}, nil
}

// isDevice reports whether the target is an attached device.
func (t controlTarget) isDevice() bool { return t.device >= 0 }

// control sends req and decodes the result into v.
func (t controlTarget) control(req nbdbridge.ControlRequest, v any, timeout time.Duration) error {
	if t.isDevice() {
		return nbdbridge.Control(t.device, req, v, timeout)
	}
	err := nbdbridge.ControlAt(t.path, req, v, timeout)
	if err != nil && errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no dnbd3-nbd serve answers for %s (no %s): %w", t.name, t.path, err)
	}
	return err
}

// query reads the daemon's status into v.
func (t controlTarget) query(v any) error {
	return t.control(nbdbridge.ControlRequest{Op: "status"}, v, 2*time.Second)
}
