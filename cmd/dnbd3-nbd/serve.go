package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
)

func runServe(ctx context.Context, args []string, s stdio) int {
	sf, code, ok := parseServeFlags(args, s)
	if !ok {
		return code
	}
	log, closeLog, err := sf.f.logger(s.err)
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return exitUsage
	}
	defer closeLog()
	mln, err := listenMetrics(sf.metricsAddr)
	if err != nil {
		return exitWith(s, "serve", err)
	}
	ln, err := sf.lc.Listen(sf.listen)
	if err != nil {
		if mln != nil {
			mln.Close()
		}
		return exitWith(s, "serve", err)
	}
	img, err := sf.f.open(ctx, log)
	if err != nil {
		ln.Close()
		return exitWith(s, "serve", err)
	}
	defer img.Close()
	var backend nbdbridge.Backend = imageBackend{img}
	var cs *cowSession
	if sf.cow.enabled() {
		if cs, err = openCOW(ctx, &sf.cow, img, log); err != nil {
			ln.Close()
			return exitWith(s, "serve", err)
		}
		backend = cs.overlay
	}
	eng := nbdbridge.NewEngine(backend, nbdbridge.EngineOptions{Logger: log, Workers: remoteWorkers})
	defer serveControl(sf.listen, log, img, backend, eng, cs)()
	defer serveMetrics(mln, &bridgeCollector{device: "serve:" + sf.listen, engine: func() *nbdbridge.Engine { return eng }, img: img, cow: cs}, log)()
	log.Info("serving", "listen", sf.listen, "image", img.Name(), "rid", img.RID(), "size", img.Size())
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

// serveFlags are serve's command line.
type serveFlags struct {
	f      imageFlags
	cow    cowFlags
	listen string
	lc     *nbdbridge.ListenConfig
	// metricsAddr is --metrics-listen (metrics.go).
	metricsAddr string
}

// parseServeFlags parses and checks serve's command line; ok is false
// when the program ends here with code.
func parseServeFlags(args []string, s stdio) (sf *serveFlags, code int, ok bool) {
	sf = &serveFlags{}
	var socketMode string
	var insecureWritable bool
	fs := newImageFlagSet("serve", s, &sf.f, &sf.cow)
	sf.cow.statsOut = s.out
	addMetricsFlag(fs, &sf.metricsAddr)
	fs.StringVar(&sf.listen, "listen", "", "where to export: unix:PATH or tcp:HOST:PORT")
	fs.StringVar(&socketMode, "socket-mode", "0600", "permission of the unix:PATH socket file (octal); 0660 lets the file's group connect")
	fs.BoolVar(&insecureWritable, "insecure-writable", false, "allow a writable export (-c/-L) on tcp: or an abstract unix:@ socket, where anyone who can connect may change the session")
	setHelp(fs, s, "Usage: dnbd3-nbd serve -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [-S] --listen unix:PATH|tcp:ADDR [--socket-mode 0600]\n"+
		"                       [-c DIR | -L DIR] [-C MERGER] [-m] [--insecure-writable]\n\n"+
		"Exports a DNBD3 image over the NBD protocol (fixed newstyle) without the kernel, for QEMU\n"+
		"(-drive file=nbd:unix:PATH) and libnbd tools (nbdinfo, nbdcopy). The export name is the image\n"+
		"name; the empty name works as well. With -c or -L the export is writable (copy-on-write session).\n"+
		"The socket file is created with mode 0600 (--socket-mode). NBD has no authentication here, so a\n"+
		"writable export on tcp: or on an abstract socket needs --insecure-writable.\n")
	if code, ok := parseFlags(fs, args, s, "serve"); !ok {
		return nil, code, false
	}
	fail := func(err error) (*serveFlags, int, bool) {
		fmt.Fprintf(s.err, "dnbd3-nbd serve: %v\n", err)
		return nil, exitUsage, false
	}
	if err := sf.f.validateWithCOW(&sf.cow); err != nil {
		return fail(err)
	}
	if sf.listen == "" {
		return fail(errors.New("--listen unix:PATH or tcp:HOST:PORT is required"))
	}
	lc, err := listenConfig(sf.listen, socketMode, fs.Changed("socket-mode"))
	if err != nil {
		return fail(err)
	}
	sf.lc = lc
	if sf.cow.enabled() && nbdbridge.ListenAddrUnguarded(sf.listen) && !insecureWritable {
		return fail(fmt.Errorf("refusing a writable export (-c/-L) on %s: anyone who can connect could change the session, "+
			"as NBD has no authentication here. Listen on unix:PATH (mode 0600, widen with --socket-mode), "+
			"or add --insecure-writable if every client that can reach it is trusted", sf.listen))
	}
	return sf, 0, true
}

// serveControl starts the export's control socket beside its unix socket
// (status, servers); tcp: and abstract exports have none. The returned
// function stops it and removes the socket file.
func serveControl(listen string, log *slog.Logger, img *client.Image, backend nbdbridge.Backend, eng *nbdbridge.Engine, cs *cowSession) func() {
	path := serveControlPath(listen)
	if path == "" {
		return func() {}
	}
	started := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	handle := func(req nbdbridge.ControlRequest) (any, error) {
		if v, ok, err := serverControl(ctx, img, req, nil); ok {
			return v, err
		}
		if req.Op == "status" {
			return exportStatus(listen, started, img, backend, eng, cs), nil
		}
		return nil, fmt.Errorf("unknown request %q", req.Op)
	}
	if err := nbdbridge.ServeControlAt(ctx, path, handle); err != nil {
		log.Warn("no control socket; status and servers will not work for this export", "err", err)
		cancel()
		return func() {}
	}
	return func() {
		cancel()
		os.Remove(path)
	}
}

// exportStatus is what a serve reports on its control socket.
func exportStatus(listen string, started time.Time, img *client.Image, backend nbdbridge.Backend, eng *nbdbridge.Engine, cs *cowSession) attachStatus {
	clientStats := img.Stats()
	state := "serving"
	if clientStats.Panic {
		state = "failover"
	}
	st := attachStatus{Listen: listen, PID: os.Getpid(), Image: img.Name(), RID: img.RID(), Size: backend.Size(),
		ReadOnly: cs == nil, State: state, Started: started, Client: clientStats, Engine: eng.Stats()}
	if cs != nil {
		st.COW = cs.status()
	}
	return st
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
