package main

import (
	"context"
	"fmt"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

func runServe(ctx context.Context, args []string, s stdio) int {
	var f imageFlags
	var listen string
	fs := pflag.NewFlagSet("dnbd3-nbd serve", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(s.err)
	f.register(fs)
	fs.StringVar(&listen, "listen", "", "where to export: unix:PATH or tcp:HOST:PORT")
	fs.Usage = func() {
		fmt.Fprintf(s.err, "Usage: dnbd3-nbd serve -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [-S] --listen unix:PATH|tcp:ADDR\n\n"+
			"Exports a DNBD3 image over the NBD protocol (fixed newstyle) without the kernel, for QEMU\n"+
			"(-drive file=nbd:unix:PATH) and libnbd tools (nbdinfo, nbdcopy). The export name is the image\n"+
			"name; the empty name works as well.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, s, "serve"); !ok {
		return code
	}
	if err := f.validate(); err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return exitUsage
	}
	if listen == "" {
		fmt.Fprintln(s.err, "dnbd3-nbd serve: --listen unix:PATH or tcp:HOST:PORT is required")
		return exitUsage
	}
	log, closeLog, err := f.logger(s.err)
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return exitUsage
	}
	defer closeLog()
	ln, err := nbdbridge.ListenAddr(listen)
	if err != nil {
		return exitWith(s, "serve", err)
	}
	img, err := f.open(ctx, log)
	if err != nil {
		ln.Close()
		return exitWith(s, "serve", err)
	}
	defer img.Close()
	eng := nbdbridge.NewEngine(imageBackend{img}, nbdbridge.EngineOptions{Logger: log, Workers: remoteWorkers})
	log.Info("serving", "listen", listen, "image", img.Name(), "rid", img.RID(), "size", img.Size())
	fmt.Fprintln(s.out, ln.Addr().String())
	if err := eng.ServeListener(ctx, ln, img.Name(), fmt.Sprintf("dnbd3 image %s rid %d", img.Name(), img.RID())); err != nil && ctx.Err() == nil {
		return exitWith(s, "serve", err)
	}
	log.Info("stopped")
	return exitOK
}
