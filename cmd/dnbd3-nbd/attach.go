package main

import (
	"context"
	"fmt"
	"log/slog"
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
	Device      string                `json:"device"`           // serve: ""
	Listen      string                `json:"listen,omitempty"` // serve: the export's address
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
	a, code, ok := parseAttachFlags(args, s)
	if !ok {
		return code
	}
	log, closeLog, err := a.f.logger(s.err)
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd attach: %v\n", err)
		return exitUsage
	}
	defer closeLog()
	// Fail fast on a missing module or missing privileges, before talking
	// to any server.
	if err := nbdbridge.Available(); err != nil {
		return exitWith(s, "attach", err)
	}
	// The device's writeback runs through this process: keep it from
	// deadlocking in memory reclaim (I/O flusher, locked memory, OOM).
	nbdbridge.ProtectDaemon(log, a.oomScoreAdj)
	mln, err := listenMetrics(a.metricsAddr)
	if err != nil {
		return exitWith(s, "attach", err)
	}
	img, err := a.f.open(ctx, log)
	if err != nil {
		return exitWith(s, "attach", err)
	}
	defer img.Close()
	var cs *cowSession
	if a.cow.enabled() {
		if cs, err = openCOW(ctx, &a.cow, img, log); err != nil {
			return exitWith(s, "attach", err)
		}
	}
	dev, err := a.attach(ctx, img, cs, log)
	if err != nil {
		if cs != nil {
			cs.finish(context.Background(), false)
		}
		return exitWith(s, "attach", err)
	}
	defer serveMetrics(mln, &bridgeCollector{device: dev.Path, engine: dev.Engine, img: img, cow: cs}, log)()
	ctlCtx, stopCtl := context.WithCancel(context.Background())
	defer stopCtl()
	status := a.statusFunc(img, dev, cs, time.Now())
	if err := nbdbridge.ServeControl(ctlCtx, dev.Index, attachControl(ctlCtx, img, dev, status)); err != nil {
		log.Warn("no control socket; list/status will show less", "err", err)
	}
	log.Info("attached", "device", dev.Path, "image", img.Name(), "rid", img.RID(), "size", img.Size(),
		"server", img.Stats().Current, "tookOver", dev.TookOver, "mode", dev.SlotStatus().Mode)
	fmt.Fprintln(s.out, dev.Path)
	sd := notifyAttached(ctx, log, status)
	defer sd.Stop()
	detached := waitDetach(ctx, dev, a.force, log)
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

// attachFlags are attach's command line.
type attachFlags struct {
	f             imageFlags
	cow           cowFlags
	device        string
	index         int // of device, -1: the kernel picks
	conns         int
	blockSize     uint64
	deadConn      time.Duration
	force         bool
	oomScoreAdj   int
	readAhead     int
	maxRequest    int
	kernelDirect  bool
	directTimeout time.Duration
	metricsAddr   string
}

// parseAttachFlags parses and checks attach's command line; ok is false
// when the program ends here with code.
func parseAttachFlags(args []string, s stdio) (a *attachFlags, code int, ok bool) {
	a = &attachFlags{index: -1}
	fs := newImageFlagSet("attach", s, &a.f, &a.cow)
	a.cow.statsOut = s.out
	fs.StringVar(&a.device, "device", "", "use this device (/dev/nbdN); default: the kernel picks a free one")
	fs.IntVar(&a.conns, "connections", min(4, runtime.NumCPU()), "connections (socketpairs) to the kernel")
	fs.Uint64Var(&a.blockSize, "block-size", 512, "logical block size: 512 or 4096")
	fs.DurationVar(&a.deadConn, "dead-conn-timeout", nbdbridge.DefaultDeadConnTimeout, "how long the kernel holds I/O for a restarted daemon")
	fs.BoolVar(&a.force, "force", false, "on SIGTERM, disconnect the device even if it is mounted or open")
	fs.IntVarP(&a.readAhead, "read-ahead", "a", nbdbridge.DefaultReadAheadKB, "read-ahead of the device in KiB, as dnbd3-client -a (0: the kernel's 128 KiB)")
	fs.IntVar(&a.maxRequest, "max-request-kb", nbdbridge.DefaultMaxRequestKB, "largest request the kernel sends, in KiB (at most 32768)")
	fs.BoolVar(&a.kernelDirect, "kernel-direct", true, "read-only: the kernel reads from servers that offer it (dnbd3go servers) with no hop through this daemon; false: always relay")
	fs.DurationVar(&a.directTimeout, "direct-timeout", nbdbridge.DefaultDirectTimeout, "kernel-direct: how long a read in flight on a failed server's connection waits before the kernel re-sends it (grows with the read latency and while a live server is slower)")
	fs.IntVar(&a.oomScoreAdj, "oom-score-adj", nbdbridge.DefaultOOMScoreAdj, "the daemon's oom_score_adj (-1000 to 1000; -1000: the OOM killer never picks it)")
	addMetricsFlag(fs, &a.metricsAddr)
	setHelp(fs, s, "Usage: dnbd3-nbd attach -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [--device /dev/nbdN] [--connections N] [--block-size 512|4096] [-a KB] [-S] [-l LOG]\n"+
		"                        [-c DIR | -L DIR] [-C MERGER] [-m] [--upload-uuid UUID] [--cow-stats-file] [--cow-stats-stdout]\n\n"+
		"Attaches a DNBD3 image as /dev/nbdX, prints the device path once it is ready and serves it in the\n"+
		"foreground until it is detached or the process gets SIGTERM. The device is read-only, or writable\n"+
		"with a copy-on-write session (-c new, -L load) whose changes upload to a merger (-C) in the background.\n"+
		"A read-only device on dnbd3go servers is kernel-direct: the kernel reads from the server itself.\n")
	if code, ok := parseFlags(fs, args, s, "attach"); !ok {
		return nil, code, false
	}
	if err := a.validate(); err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd attach: %v\n", err)
		return nil, exitUsage, false
	}
	return a, 0, true
}

// validate checks the flags' ranges and combinations.
func (a *attachFlags) validate() error {
	if err := a.f.validateWithCOW(&a.cow); err != nil {
		return err
	}
	switch {
	case a.blockSize != 512 && a.blockSize != 4096:
		return fmt.Errorf("--block-size %d: want 512 or 4096", a.blockSize)
	case a.conns < 1 || a.conns > 64:
		return fmt.Errorf("--connections %d: want 1 to 64", a.conns)
	case a.readAhead < 0 || a.readAhead > 1<<20:
		return fmt.Errorf("--read-ahead %d: want 0 to 1048576 KiB", a.readAhead)
	case a.maxRequest < 4 || a.maxRequest > 32768:
		return fmt.Errorf("--max-request-kb %d: want 4 to 32768", a.maxRequest)
	case a.directTimeout < 100*time.Millisecond || a.directTimeout > time.Hour:
		return fmt.Errorf("--direct-timeout %v: want 100ms to 1h", a.directTimeout)
	case a.oomScoreAdj < -1000 || a.oomScoreAdj > 1000:
		return fmt.Errorf("--oom-score-adj %d: want -1000 to 1000", a.oomScoreAdj)
	}
	if a.readAhead == 0 {
		a.readAhead = 128 // the block layer's default
	}
	if a.device != "" {
		var err error
		if a.index, err = nbdbridge.ParseDevice(a.device); err != nil {
			return fmt.Errorf("--device: %v", err)
		}
	}
	return nil
}

// attach connects the image (through the COW session cs, if any) to an
// NBD device.
func (a *attachFlags) attach(ctx context.Context, img *client.Image, cs *cowSession, log *slog.Logger) (*nbdbridge.Device, error) {
	// The kernel's request timeout stays above our own deadline, so a read
	// that cannot be served fails with EIO from us, not with a dead socket.
	// (It also bounds how long I/O that was in flight when a daemon died
	// waits after a successor took the device over.)
	kernelTimeout := a.f.timeout + 10*time.Second
	if a.f.timeout == 0 {
		kernelTimeout = 24 * time.Hour // never fail I/O; a stuck socket is reconfigured
	}
	var backend nbdbridge.Backend = imageBackend{img}
	backendID := "dnbd3go:" + img.Name() + ":r" + strconv.Itoa(int(img.RID()))
	info := map[string]string{"image": img.Name(), "rid": strconv.Itoa(int(img.RID())), "servers": a.f.hosts}
	var direct nbdbridge.DirectDialer
	if cs != nil {
		backend, backendID, info["cow"] = cs.overlay, cs.backendID(), a.cow.dir()
	} else if a.kernelDirect {
		direct = directDialer{img}
	}
	return nbdbridge.Attach(ctx, nbdbridge.AttachOptions{
		Direct:          direct,
		Backend:         backend,
		Device:          a.index,
		Connections:     a.conns,
		BlockSize:       a.blockSize,
		Timeout:         kernelTimeout,
		DeadConnTimeout: a.deadConn,
		BackendID:       backendID,
		Info:            info,
		Workers:         remoteWorkers,
		ReadAheadKB:     a.readAhead,
		MaxRequestKB:    a.maxRequest,
		DirectTimeout:   a.directTimeout,
		Logger:          log,
	})
}

// statusFunc returns what `dnbd3-nbd status` and systemd's STATUS show.
func (a *attachFlags) statusFunc(img *client.Image, dev *nbdbridge.Device, cs *cowSession, started time.Time) func() attachStatus {
	return func() attachStatus {
		clientStats := img.Stats()
		state := "serving"
		if clientStats.Panic {
			state = "failover"
		}
		st := attachStatus{Device: dev.Path, PID: os.Getpid(), Image: img.Name(), RID: img.RID(), Size: dev.Engine().Size(),
			BlockSize: a.blockSize, Connections: a.conns, ReadOnly: cs == nil, State: state, Started: started,
			Client: clientStats, Engine: dev.Engine().Stats(), Slots: dev.SlotStatus()}
		if cs != nil {
			st.COW = cs.status()
		}
		return st
	}
}

// attachControl answers the daemon's control socket: status, resize and
// the server list (servers add/remove/switch).
func attachControl(ctx context.Context, img *client.Image, dev *nbdbridge.Device, status func() attachStatus) func(nbdbridge.ControlRequest) (any, error) {
	return func(req nbdbridge.ControlRequest) (any, error) {
		if v, ok, err := serverControl(ctx, img, req, dev.FollowPreferred); ok {
			return v, err
		}
		switch req.Op {
		case "status":
			return status(), nil
		case "resize":
			devSize, err := dev.Resize(req.Size)
			return map[string]int64{"size": req.Size, "deviceSize": devSize}, err
		}
		return nil, fmt.Errorf("unknown request %q", req.Op)
	}
}

// waitDetach serves until a signal or a disconnect and then shuts the
// device down; it reports whether the device was detached.
func waitDetach(ctx context.Context, dev *nbdbridge.Device, force bool, log *slog.Logger) bool {
	select {
	case <-ctx.Done():
		log.Info("signal received, shutting down", "device", dev.Path)
		d, err := dev.Shutdown(force)
		if err != nil {
			log.Error("shutdown", "err", err)
		}
		return d
	case <-dev.Disconnected():
		log.Info("device was disconnected", "device", dev.Path)
		if _, err := dev.Shutdown(true); err != nil {
			log.Warn("cleanup after disconnect", "err", err)
		}
		return true
	}
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
