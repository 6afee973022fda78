package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

// attachStatus is what a running attach reports on its control socket
// (read by list and status).
type attachStatus struct {
	Device      string                `json:"device"`
	PID         int                   `json:"pid"`
	Image       string                `json:"image"`
	RID         uint16                `json:"rid"`
	Size        int64                 `json:"size"`
	BlockSize   uint64                `json:"blockSize"`
	Connections int                   `json:"connections"`
	ReadOnly    bool                  `json:"readOnly"`
	State       string                `json:"state"` // serving, failover
	Started     time.Time             `json:"started"`
	Client      client.Stats          `json:"client"`
	Engine      nbdbridge.EngineStats `json:"engine"`
	Slots       nbdbridge.SlotStatus  `json:"slots"`
	COW         *cowStatus            `json:"cow,omitempty"`
}

func runAttach(ctx context.Context, args []string, s stdio) int {
	var f imageFlags
	var device string
	var conns int
	var blockSize uint64
	var deadConn time.Duration
	var force bool
	var oomScoreAdj int
	var readAhead, maxRequest int
	var kernelDirect bool
	var directTimeout time.Duration
	var metricsAddr string
	var cow cowFlags
	fs := newImageFlagSet("attach", s, &f, &cow)
	fs.StringVar(&device, "device", "", "use this device (/dev/nbdN); default: the kernel picks a free one")
	fs.IntVar(&conns, "connections", min(4, runtime.NumCPU()), "connections (socketpairs) to the kernel")
	fs.Uint64Var(&blockSize, "block-size", 512, "logical block size: 512 or 4096")
	fs.DurationVar(&deadConn, "dead-conn-timeout", nbdbridge.DefaultDeadConnTimeout, "how long the kernel holds I/O for a restarted daemon")
	fs.BoolVar(&force, "force", false, "on SIGTERM, disconnect the device even if it is mounted or open")
	fs.IntVarP(&readAhead, "read-ahead", "a", nbdbridge.DefaultReadAheadKB, "read-ahead of the device in KiB, as dnbd3-client -a (0: the kernel's 128 KiB)")
	fs.IntVar(&maxRequest, "max-request-kb", nbdbridge.DefaultMaxRequestKB, "largest request the kernel sends, in KiB (at most 32768)")
	fs.BoolVar(&kernelDirect, "kernel-direct", true, "read-only: the kernel reads from servers that offer it (dnbd3go servers) with no hop through this daemon; false: always relay")
	fs.DurationVar(&directTimeout, "direct-timeout", nbdbridge.DefaultDirectTimeout, "kernel-direct: how long a read in flight on a failed server's connection waits before the kernel re-sends it (grows with the read latency and while a live server is slower)")
	fs.IntVar(&oomScoreAdj, "oom-score-adj", nbdbridge.DefaultOOMScoreAdj, "the daemon's oom_score_adj (-1000 to 1000; -1000: the OOM killer never picks it)")
	addMetricsFlag(fs, &metricsAddr)
	fs.Usage = func() {
		fmt.Fprintf(s.err, "Usage: dnbd3-nbd attach -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [--device /dev/nbdN] [--connections N] [--block-size 512|4096] [-a KB] [-S] [-l LOG]\n"+
			"                        [-c DIR | -L DIR] [-C MERGER] [-m] [--upload-uuid UUID] [--cow-stats-file] [--cow-stats-stdout]\n\n"+
			"Attaches a DNBD3 image as /dev/nbdX, prints the device path once it is ready and serves it in the\n"+
			"foreground until it is detached or the process gets SIGTERM. The device is read-only, or writable\n"+
			"with a copy-on-write session (-c new, -L load) whose changes upload to a merger (-C) in the background.\n"+
			"A read-only device on dnbd3go servers is kernel-direct: the kernel reads from the server itself.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, s, "attach"); !ok {
		return code
	}
	bad := func(format string, a ...any) int {
		fmt.Fprintf(s.err, "dnbd3-nbd attach: "+format+"\n", a...)
		return exitUsage
	}
	if err := f.validateWithCOW(&cow); err != nil {
		return bad("%v", err)
	}
	if blockSize != 512 && blockSize != 4096 {
		return bad("--block-size %d: want 512 or 4096", blockSize)
	}
	if conns < 1 || conns > 64 {
		return bad("--connections %d: want 1 to 64", conns)
	}
	if readAhead < 0 || readAhead > 1<<20 {
		return bad("--read-ahead %d: want 0 to 1048576 KiB", readAhead)
	}
	if maxRequest < 4 || maxRequest > 32768 {
		return bad("--max-request-kb %d: want 4 to 32768", maxRequest)
	}
	if directTimeout < 100*time.Millisecond || directTimeout > time.Hour {
		return bad("--direct-timeout %v: want 100ms to 1h", directTimeout)
	}
	if readAhead == 0 {
		readAhead = 128 // the block layer's default
	}
	if oomScoreAdj < -1000 || oomScoreAdj > 1000 {
		return bad("--oom-score-adj %d: want -1000 to 1000", oomScoreAdj)
	}
	index := -1
	if device != "" {
		var err error
		if index, err = nbdbridge.ParseDevice(device); err != nil {
			return bad("--device: %v", err)
		}
	}
	log, closeLog, err := f.logger(s.err)
	if err != nil {
		return bad("%v", err)
	}
	defer closeLog()
	// Fail fast on a missing module or missing privileges, before talking
	// to any server.
	if err := nbdbridge.Available(); err != nil {
		return exitWith(s, "attach", err)
	}
	// The device's writeback runs through this process: keep it from
	// deadlocking in memory reclaim (I/O flusher, locked memory, OOM).
	nbdbridge.ProtectDaemon(log, oomScoreAdj)
	mln, err := listenMetrics(metricsAddr)
	if err != nil {
		return exitWith(s, "attach", err)
	}
	img, err := f.open(ctx, log)
	if err != nil {
		return exitWith(s, "attach", err)
	}
	defer img.Close()

	// The kernel's request timeout stays above our own deadline, so a read
	// that cannot be served fails with EIO from us, not with a dead socket.
	// (It also bounds how long I/O that was in flight when a daemon died
	// waits after a successor took the device over.)
	kernelTimeout := f.timeout + 10*time.Second
	if f.timeout == 0 {
		kernelTimeout = 24 * time.Hour // never fail I/O; a stuck socket is reconfigured
	}
	var backend nbdbridge.Backend = imageBackend{img}
	backendID := "dnbd3go:" + img.Name() + ":r" + strconv.Itoa(int(img.RID()))
	info := map[string]string{"image": img.Name(), "rid": strconv.Itoa(int(img.RID())), "servers": f.hosts}
	var cs *cowSession
	if cow.enabled() {
		if cs, err = openCOW(ctx, &cow, img, log); err != nil {
			return exitWith(s, "attach", err)
		}
		backend, backendID, info["cow"] = cs.overlay, cs.backendID(), cow.dir()
	}
	var direct nbdbridge.DirectDialer
	if kernelDirect && cs == nil {
		direct = directDialer{img}
	}
	dev, err := nbdbridge.Attach(ctx, nbdbridge.AttachOptions{
		Direct:          direct,
		Backend:         backend,
		Device:          index,
		Connections:     conns,
		BlockSize:       blockSize,
		Timeout:         kernelTimeout,
		DeadConnTimeout: deadConn,
		BackendID:       backendID,
		Info:            info,
		Workers:         remoteWorkers,
		ReadAheadKB:     readAhead,
		MaxRequestKB:    maxRequest,
		DirectTimeout:   directTimeout,
		Logger:          log,
	})
	if err != nil {
		if cs != nil {
			cs.finish(context.Background(), false)
		}
		return exitWith(s, "attach", err)
	}
	started := time.Now()
	defer serveMetrics(mln, &bridgeCollector{device: dev.Path, engine: dev.Engine, img: img, cow: cs}, log)()
	ctlCtx, stopCtl := context.WithCancel(context.Background())
	defer stopCtl()
	status := func() attachStatus {
		clientStats := img.Stats()
		state := "serving"
		if clientStats.Panic {
			state = "failover"
		}
		st := attachStatus{Device: dev.Path, PID: os.Getpid(), Image: img.Name(), RID: img.RID(), Size: backend.Size(),
			BlockSize: blockSize, Connections: conns, ReadOnly: cs == nil, State: state, Started: started,
			Client: clientStats, Engine: dev.Engine().Stats(), Slots: dev.SlotStatus()}
		if cs != nil {
			st.COW = cs.status()
		}
		return st
	}
	handle := func(req nbdbridge.ControlRequest) (any, error) {
		switch req.Op {
		case "status":
			return status(), nil
		case "resize":
			devSize, err := dev.Resize(req.Size)
			return map[string]int64{"size": req.Size, "deviceSize": devSize}, err
		}
		return nil, fmt.Errorf("unknown request %q", req.Op)
	}
	if err := nbdbridge.ServeControl(ctlCtx, dev.Index, handle); err != nil {
		log.Warn("no control socket; list/status will show less", "err", err)
	}
	log.Info("attached", "device", dev.Path, "image", img.Name(), "rid", img.RID(), "size", img.Size(),
		"server", img.Stats().Current, "tookOver", dev.TookOver, "mode", dev.SlotStatus().Mode)
	fmt.Fprintln(s.out, dev.Path)
	sd := notifyAttached(ctx, log, status)
	defer sd.Stop()

	detached := false
	select {
	case <-ctx.Done():
		log.Info("signal received, shutting down", "device", dev.Path)
		d, err := dev.Shutdown(force)
		if err != nil {
			log.Error("shutdown", "err", err)
		}
		detached = d
	case <-dev.Disconnected():
		log.Info("device was disconnected", "device", dev.Path)
		if _, err := dev.Shutdown(true); err != nil {
			log.Warn("cleanup after disconnect", "err", err)
		}
		detached = true
	}
	if cs != nil {
		// The final upload may take a while; a second SIGTERM/SIGINT aborts it.
		fctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		if err := cs.finish(fctx, detached); err != nil {
			return exitWith(s, "attach", err)
		}
	}
	return exitOK
}

// directDialer gives the device connections for the kernel-direct path,
// to the server the client library chose.
type directDialer struct{ img *client.Image }

func (d directDialer) DialDirect(ctx context.Context, n int) ([]net.Conn, string, error) {
	return d.img.DialNBD(ctx, n)
}
func (d directDialer) Preferred() string { return d.img.Current() }

// parseFlags parses the flags of a command without positional arguments;
// ok is false when the command should return code.
func parseFlags(fs *pflag.FlagSet, args []string, s stdio, name string) (code int, ok bool) {
	if code, ok := parseFlagArgs(fs, args, s, name); !ok {
		return code, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(s.err, "dnbd3-nbd %s: unexpected argument %q\n", name, fs.Arg(0))
		return exitUsage, false
	}
	return 0, true
}

// parseFlagArgs parses args and leaves the positional arguments to the
// caller; ok is false when the command should return code (0 after
// --help).
func parseFlagArgs(fs *pflag.FlagSet, args []string, s stdio, name string) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK, false
		}
		fmt.Fprintf(s.err, "dnbd3-nbd %s: %v\n", name, err)
		return exitUsage, false
	}
	return 0, true
}
