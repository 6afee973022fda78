package main

import (
	"context"
	"fmt"
	"os/signal"
	"syscall"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

func runServe(ctx context.Context, args []string, s stdio) int {
	var f imageFlags
	var cow cowFlags
	var listen string
	fs := newImageFlagSet("serve", s, &f, &cow)
	fs.StringVar(&listen, "listen", "", "where to export: unix:PATH or tcp:HOST:PORT")
	fs.Usage = func() {
		fmt.Fprintf(s.err, "Usage: dnbd3-nbd serve -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [-S] --listen unix:PATH|tcp:ADDR [-c DIR | -L DIR] [-C MERGER] [-m]\n\n"+
			"Exports a DNBD3 image over the NBD protocol (fixed newstyle) without the kernel, for QEMU\n"+
			"(-drive file=nbd:unix:PATH) and libnbd tools (nbdinfo, nbdcopy). The export name is the image\n"+
			"name; the empty name works as well. With -c or -L the export is writable (copy-on-write session).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, s, "serve"); !ok {
		return code
	}
	if err := f.validateWithCOW(&cow); err != nil {
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
	var backend nbdbridge.Backend = imageBackend{img}
	var cs *cowSession
	if cow.enabled() {
		if cs, err = openCOW(ctx, &cow, img, log); err != nil {
			ln.Close()
			return exitWith(s, "serve", err)
		}
		backend = cs.overlay
	}
	eng := nbdbridge.NewEngine(backend, nbdbridge.EngineOptions{Logger: log, Workers: remoteWorkers})
	log.Info("serving", "listen", listen, "image", img.Name(), "rid", img.RID(), "size", img.Size())
	fmt.Fprintln(s.out, ln.Addr().String())
	serr := eng.ServeListener(ctx, ln, img.Name(), fmt.Sprintf("dnbd3 image %s rid %d", img.Name(), img.RID()))
	eng.Close()
	eng.Wait(context.Background())
	if cs != nil {
		// every connection ended: nothing writes any more; upload the rest
		fctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		if err := cs.finish(fctx, true); err != nil {
			return exitWith(s, "serve", err)
		}
	}
	if serr != nil && ctx.Err() == nil {
		return exitWith(s, "serve", serr)
	}
	log.Info("stopped")
	return exitOK
}
