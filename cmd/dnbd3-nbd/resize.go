package main

import (
	"context"
	"fmt"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

func runResize(ctx context.Context, args []string, s stdio) int {
	fs := pflag.NewFlagSet("dnbd3-nbd resize", pflag.ContinueOnError)
	fs.SetOutput(s.err)
	setHelp(fs, s, "Usage: dnbd3-nbd resize /dev/nbdN SIZE\n       dnbd3-nbd resize /dev/nbdN      (check only: exit 0 if the device can be resized)\n\n"+
		"Changes the size of a copy-on-write device (attached with -c or -L): the session gets exactly\n"+
		"SIZE bytes (suffixes K, M, G, T), the device SIZE rounded down to its block size. Growing reads\n"+
		"zeros past the old end; shrinking and growing again does not bring old data back.\n")
	if code, ok := parseFlagArgs(fs, args, s, "resize"); !ok {
		return code
	}
	if fs.NArg() != 1 && fs.NArg() != 2 {
		fmt.Fprintln(s.err, "dnbd3-nbd resize: want /dev/nbdN [SIZE] (see --help)")
		return exitUsage
	}
	index, err := nbdbridge.ParseDevice(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd resize: %v\n", err)
		return exitUsage
	}
	if fs.NArg() == 1 {
		var st attachStatus
		if err := nbdbridge.QueryControl(index, &st); err != nil {
			return exitWith(s, "resize", fmt.Errorf("%s: %w", nbdbridge.DevicePath(index), err))
		}
		if st.COW == nil {
			return exitWith(s, "resize", fmt.Errorf("%s is not a copy-on-write device (attach with -c or -L)", nbdbridge.DevicePath(index)))
		}
		fmt.Fprintf(s.out, "%s: copy-on-write image of %d bytes, resizable\n", nbdbridge.DevicePath(index), st.COW.Size)
		return exitOK
	}
	size, err := units.ParseSize(fs.Arg(1))
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd resize: %v\n", err)
		return exitUsage
	}
	var res struct {
		Size       int64 `json:"size"`
		DeviceSize int64 `json:"deviceSize"`
	}
	if err := nbdbridge.Control(index, nbdbridge.ControlRequest{Op: "resize", Size: size}, &res, time.Minute); err != nil {
		return exitWith(s, "resize", fmt.Errorf("%s: %w", nbdbridge.DevicePath(index), err))
	}
	fmt.Fprintf(s.out, "%s: image %d bytes, device %d bytes\n", nbdbridge.DevicePath(index), res.Size, res.DeviceSize)
	return exitOK
}
