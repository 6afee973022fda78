package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

func runServe(ctx context.Context, args []string, s stdio) int {
	var f imageFlags
	var cow cowFlags
	var listen, socketMode string
	var insecureWritable bool
	var metricsAddr string
	fs := newImageFlagSet("serve", s, &f, &cow)
	addMetricsFlag(fs, &metricsAddr)
	fs.StringVar(&listen, "listen", "", "where to export: unix:PATH or tcp:HOST:PORT")
	fs.StringVar(&socketMode, "socket-mode", "0600", "permission of the unix:PATH socket file (octal); 0660 lets the file's group connect")
	fs.BoolVar(&insecureWritable, "insecure-writable", false, "allow a writable export (-c/-L) on tcp: or an abstract unix:@ socket, where anyone who can connect may change the session")
	fs.Usage = func() {
		fmt.Fprintf(s.err, "Usage: dnbd3-nbd serve -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [-S] --listen unix:PATH|tcp:ADDR [--socket-mode 0600]\n"+
			"                       [-c DIR | -L DIR] [-C MERGER] [-m] [--insecure-writable]\n\n"+
			"Exports a DNBD3 image over the NBD protocol (fixed newstyle) without the kernel, for QEMU\n"+
			"(-drive file=nbd:unix:PATH) and libnbd tools (nbdinfo, nbdcopy). The export name is the image\n"+
			"name; the empty name works as well. With -c or -L the export is writable (copy-on-write session).\n"+
			"The socket file is created with mode 0600 (--socket-mode). NBD has no authentication here, so a\n"+
			"writable export on tcp: or on an abstract socket needs --insecure-writable.\n\nFlags:\n")
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
	lc, err := listenConfig(listen, socketMode, fs.Changed("socket-mode"))
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return exitUsage
	}
	if cow.enabled() && nbdbridge.ListenAddrUnguarded(listen) && !insecureWritable {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: refusing a writable export (-c/-L) on %s: anyone who can connect could change the session, "+
			"as NBD has no authentication here. Listen on unix:PATH (mode 0600, widen with --socket-mode), "+
			"or add --insecure-writable if every client that can reach it is trusted\n", listen)
		return exitUsage
	}
	log, closeLog, err := f.logger(s.err)
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return exitUsage
	}
	defer closeLog()
	mln, err := listenMetrics(metricsAddr)
	if err != nil {
		return exitWith(s, "serve", err)
	}
	ln, err := lc.Listen(listen)
	if err != nil {
		if mln != nil {
			mln.Close()
		}
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
	defer serveMetrics(mln, &bridgeCollector{device: "serve:" + listen, engine: func() *nbdbridge.Engine { return eng }, img: img, cow: cs}, log)()
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

// listenConfig checks --socket-mode (octal, 1 to 0777) against the listen
// address: only a unix socket file has a mode.
func listenConfig(listen, mode string, modeSet bool) (*nbdbridge.ListenConfig, error) {
	m, err := strconv.ParseUint(mode, 8, 32)
	if err != nil || m == 0 || m > 0o777 {
		return nil, fmt.Errorf("--socket-mode %q: want an octal permission from 0001 to 0777, e.g. 0660", mode)
	}
	if modeSet && nbdbridge.ListenAddrUnguarded(listen) {
		return nil, fmt.Errorf("--socket-mode applies to unix:PATH sockets, not %s", listen)
	}
	return &nbdbridge.ListenConfig{SocketMode: os.FileMode(m)}, nil
}
