// Command dnbd3-bench is a load generator for DNBD3 servers.
//
// Handshake mode (the reference dnbd3-bench's flags):
//
//	dnbd3-bench -h "HOSTS" -i IMAGE [-n RUNS] [-t THREADS] [-b BLOCKSIZE]
//
// Each of THREADS threads does RUNS runs; a run is, for every host, a TCP
// connect, SELECT_IMAGE, one GET_BLOCK of BLOCKSIZE bytes at a random
// unaligned offset, and close. It prints Attempts/Success/Fails per thread
// and in total, plus the elapsed time and handshakes per second.
//
// Load mode (--load, or any --duration):
//
//	dnbd3-bench -h HOSTS -i IMAGE --load [--connections N] [--block-size B]
//	            [--pattern seq|rand] [--queue-depth Q] [--duration D] [--json]
//
// keeps Q pipelined GET_BLOCKs in flight on each of N connections for D and
// prints MB/s, IOPS and latency percentiles.
//
// Idle mode (--idle N):
//
//	dnbd3-bench -h HOSTS -i IMAGE --idle N [--duration D]
//
// opens N connections, completes the handshake on each and holds them idle
// for D (default 10s), to measure a server's cost per connected client.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/spf13/pflag"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the parsed flags.
type options struct {
	hosts       string
	image       string
	rid         uint16
	runs        int
	threads     int
	blockSize   int
	load        bool
	connections int
	pattern     string
	queueDepth  int
	duration    time.Duration
	json        bool
	timeout     time.Duration
	idle        int
}

// referenceNames maps the reference dnbd3-bench's long flag names to ours.
func referenceNames(_ *pflag.FlagSet, name string) pflag.NormalizedName {
	switch name {
	case "nruns":
		name = "runs"
	case "blocksize":
		name = "block-size"
	}
	return pflag.NormalizedName(name)
}

// parseFlags parses and validates the command line. A nil error with
// done=true means --help or --version was shown (on stdout).
func parseFlags(args []string, stdout, stderr io.Writer) (o options, done bool, err error) {
	fs := pflag.NewFlagSet("dnbd3-bench", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(stderr)
	fs.SetNormalizeFunc(referenceNames)
	var bs string
	fs.StringVarP(&o.hosts, "host", "h", "", `servers, space-separated "host[:port] ..." (default port 5003)`)
	fs.StringVarP(&o.image, "image", "i", "", "image name")
	fs.Uint16VarP(&o.rid, "rid", "r", 0, "revision (0 = latest)")
	fs.IntVarP(&o.runs, "runs", "n", 100, "handshake mode: runs per thread (also --nruns)")
	fs.IntVarP(&o.threads, "threads", "t", 1, "handshake mode: threads")
	fs.StringVarP(&bs, "block-size", "b", "", "bytes per GET_BLOCK (default 4096 in handshake mode, 1M in load mode; also --blocksize)")
	fs.BoolVar(&o.load, "load", false, "load mode: pipelined reads for --duration")
	fs.IntVar(&o.connections, "connections", 1, "load mode: connections")
	fs.StringVar(&o.pattern, "pattern", "seq", "load mode: seq or rand (block-aligned)")
	fs.IntVar(&o.queueDepth, "queue-depth", 8, "load mode: requests in flight per connection")
	fs.DurationVar(&o.duration, "duration", 0, "load mode: how long to run (default 10s; setting it selects load mode)")
	fs.BoolVar(&o.json, "json", false, "print the result as JSON")
	fs.DurationVar(&o.timeout, "timeout", 3500*time.Millisecond, "timeout for connect + handshake (+ read in handshake mode)")
	fs.IntVar(&o.idle, "idle", 0, "idle mode: open N connections, complete the handshake and hold them for --duration")
	showVersion := new(bool)
	fs.BoolVarP(showVersion, "version", "v", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprint(stdout, "Usage: dnbd3-bench -h \"HOSTS\" -i IMAGE [-n RUNS] [-t THREADS] [-b BLOCKSIZE]\n"+
			"       dnbd3-bench -h \"HOSTS\" -i IMAGE --load [--connections N] [--block-size B] [--pattern seq|rand] [--queue-depth Q] [--duration D] [--json]\n"+
			"       dnbd3-bench -h \"HOSTS\" -i IMAGE --idle N [--duration D]\n\nFlags:\n"+fs.FlagUsages())
	}
	if done, err := parseReferenceStyle(fs, args, &o, showVersion, stdout); done || err != nil {
		return o, done, err
	}
	if fs.NArg() > 0 {
		return o, false, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.hosts == "" || o.image == "" {
		return o, false, errors.New("-h HOSTS and -i IMAGE are required (see --help)")
	}
	if fs.Changed("duration") && o.idle == 0 {
		o.load = true
	}
	if err := o.setModeDefaults(bs); err != nil {
		return o, false, err
	}
	return o, false, o.check()
}

// setModeDefaults fills in the duration and block size the mode implies
// and parses --block-size (bs).
func (o *options) setModeDefaults(bs string) error {
	if (o.load || o.idle > 0) && o.duration == 0 {
		o.duration = 10 * time.Second
	}
	o.blockSize = 4096
	if o.load {
		o.blockSize = 1 << 20
	}
	if bs != "" {
		n, err := units.ParseSize(bs)
		if err != nil || n < 1 || n > 64<<20 {
			return fmt.Errorf("--block-size %q: want 1 byte to 64M", bs)
		}
		o.blockSize = int(n)
	}
	return nil
}

// check checks the ranges of the options.
func (o *options) check() error {
	switch {
	case o.idle < 0 || o.idle > 100000:
		return fmt.Errorf("--idle %d: want 0 to 100000", o.idle)
	case o.runs < 1:
		return fmt.Errorf("-n %d: want at least 1", o.runs)
	case o.threads < 1 || o.threads > 4096:
		return fmt.Errorf("-t %d: want 1 to 4096", o.threads)
	case o.connections < 1 || o.connections > 4096:
		return fmt.Errorf("--connections %d: want 1 to 4096", o.connections)
	case o.queueDepth < 1 || o.queueDepth > 1024:
		return fmt.Errorf("--queue-depth %d: want 1 to 1024", o.queueDepth)
	case o.pattern != "seq" && o.pattern != "rand":
		return fmt.Errorf("--pattern %q: want seq or rand", o.pattern)
	case o.duration < 0:
		return errors.New("--duration must not be negative")
	case o.timeout <= 0:
		return errors.New("--timeout must be positive")
	}
	return nil
}

// parseReferenceStyle parses args; done is true after --help or --version
// (printed on stdout). -h is the host flag, as in the reference: without
// a value the error points at --help.
func parseReferenceStyle(fs *pflag.FlagSet, args []string, o *options, showVersion *bool, stdout io.Writer) (done bool, err error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return true, nil
		}
		if strings.Contains(err.Error(), "'h' in -") || strings.HasSuffix(err.Error(), "argument: --host") {
			err = fmt.Errorf("%w (-h is the host flag: -h \"HOST[:PORT] ...\"; --help for help)", err)
		}
		return false, err
	}
	if *showVersion {
		fmt.Fprintln(stdout, version.String())
		return true, nil
	}
	if strings.HasPrefix(o.hosts, "-") {
		return false, fmt.Errorf("-h %q: -h is the host flag and wants servers; --help for help", o.hosts)
	}
	return false, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, help, err := parseFlags(args, stdout, stderr)
	if help {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "dnbd3-bench:", err)
		return 2
	}
	hosts, err := client.ResolveServers(ctx, []string{o.hosts})
	if err != nil {
		fmt.Fprintln(stderr, "dnbd3-bench:", err)
		return 2
	}
	if o.idle > 0 {
		if err := runIdle(ctx, hosts, o.image, o.rid, o.idle, o.duration, o.timeout, stdout); err != nil {
			fmt.Fprintln(stderr, "dnbd3-bench:", err)
			return 1
		}
		return 0
	}
	if !o.load {
		res := runHandshakes(ctx, handshakeOptions{
			hosts: hosts, image: o.image, rid: o.rid, runs: o.runs, threads: o.threads,
			blockSize: o.blockSize, timeout: o.timeout,
		})
		if o.json {
			writeJSON(stdout, struct {
				Mode string `json:"mode"`
				handshakeResult
			}{"handshake", res})
		} else {
			printHandshakes(stdout, res)
		}
		if res.Total.Fails > 0 {
			return 1
		}
		return 0
	}
	res, err := runLoad(ctx, loadOptions{
		hosts: hosts, image: o.image, rid: o.rid, connections: o.connections, blockSize: o.blockSize,
		pattern: o.pattern, queueDepth: o.queueDepth, duration: o.duration, timeout: o.timeout,
	})
	if err != nil {
		fmt.Fprintln(stderr, "dnbd3-bench:", err)
		return 1
	}
	if o.json {
		writeJSON(stdout, res)
	} else {
		printLoad(stdout, res)
	}
	if res.Errors > 0 {
		return 1
	}
	return 0
}

func writeJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
