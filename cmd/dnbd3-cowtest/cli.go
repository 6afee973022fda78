package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/spf13/pflag"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // a test failed (or could not run)
	exitUsage   = 2 // bad command line
)

// env is what run needs from the outside world; tests replace parts of it.
type env struct {
	stdout, stderr io.Writer
	// final is the context of the compare that ends -r: the first signal
	// ends the random phase, a second one aborts the compare.
	final context.Context
	// isDevice decides whether a path is used as a block device.
	isDevice func(path string, fi fs.FileInfo) bool
	// openDevice opens a block device (O_DIRECT); tests use a fake.
	openDevice func(path string, write bool) (blockDevice, error)
	// progress is the interval of -r's progress line.
	progress time.Duration
}

// mode is one of the reference's modes, by its short flag.
type mode struct {
	short, long string
}

var modes = []mode{
	{"c", "testFile"},
	{"t", "test"},
	{"v", "verify"},
	{"r", "randomTest"},
	{"x", "compare"},
	{"w", "specialTwoFiles"},
}

// options are the parsed command line.
type options struct {
	mode     string   // short letter of the mode
	paths    []string // the mode flag's value and the second path, if any
	genSize  int64    // -c SIZE
	delay    time.Duration
	minPct   int
	maxPct   int
	duration time.Duration
	seed     uint64
	seedSet  bool
	ops      int64
	nbdCmd   string
	force    bool
	l2       int64
	lo       layout // from l2
}

const usageText = `Usage: dnbd3-cowtest MODE [FLAGS]

Tests a copy-on-write image (a dnbd3go COW device /dev/nbdN, or a file on a
COW-capable FUSE mount) the way the reference dnbd3-fuse-cow-test does.

Modes (exactly one):
  -c, --testFile FILE [SIZE]       write the test image: SIZE bytes (default
                                   3892314112; K/M/G suffixes) of 0x2A
  -t, --test FILE                  standard test: 8 sub-tests (needs the 0x2A image)
  -v, --verify FILE                verify size and every byte after a standard test
  -r, --randomTest MOUNTED NORMAL  identical random writes and truncates to both
                                   until SIGINT/SIGTERM or --duration, then compare
  -x, --compare A B                compare two files or devices
  -w, --specialTwoFiles A B        fixed replay of 16 writes/truncates, then compare

Options:
`

const helpTest = `
Standard test (-t FILE) on an image whose every byte is 0x2A (made with -c):
  1 testSingleBit               sub-block writes at 0 and 6144
  2 writeOverTwoBlocks          8 KiB at 12288 (blocks 3-4)
  3 writeNotOnBlockBorder       8 KiB at 43008 (half blocks at both ends)
  4 writeOverL2                 8 KiB across an L2 boundary at 2684350464 (2 x 1.25 GiB - 4 KiB)
  5 fileSizeChanges             unaligned shrink, grow, write past the end, shrink again
  6 interleavedTest             writes with gaps that must keep the original data
  7 multipleWrites              three rewrites of two clusters (-d SEC between passes)
  8 writeLongNonAlignedPattern  1.25 GiB unaligned pattern beyond the original size
The first failure stops the run. Afterwards the image is 6576668672 bytes;
-v FILE checks every byte (again after a reload, and on the merged image).

On a block device, sizes come from BLKGETSIZE64, and resizes run
"NBDCMD resize DEVICE SIZE" (--nbd-cmd, default dnbd3-nbd); the device then
shows SIZE rounded down to its logical block size. If the device cannot be
resized, steps 5 and 8 are skipped (SKIP lines, not failures). All device I/O
uses O_DIRECT, so reads come from the device, not from the page cache.
`

const helpRandom = `
Random test (-r MOUNTED NORMAL): NORMAL is a plain copy of the original image,
MOUNTED the COW image. Both get the same operations:
  5%  truncate both to a size in [-y%, -z%] of NORMAL's original size
  81% an unaligned write (up to 1310720 bytes, small sizes favoured)
  14% a 4 KiB aligned write
at offsets anywhere in the current size, until SIGINT/SIGTERM (a second
signal aborts the compare), --duration or --ops, then a compare (-x); the
exit code is the compare's. The seed is printed; --seed N --ops K replays a
run exactly. With a device, writes end at the device's current size.
`

// parseArgs parses the command line. help is true when --help was asked
// for (the text is already printed).
func parseArgs(args []string, stdout io.Writer) (o options, help bool, err error) {
	fs := pflag.NewFlagSet("dnbd3-cowtest", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(io.Discard)
	// The modes are listed in usageText, with their second arguments.
	modeVals := make(map[string]*string, len(modes))
	for _, m := range modes {
		modeVals[m.short] = fs.StringP(m.long, m.short, "", "mode")
		_ = fs.MarkHidden(m.long)
	}
	var delay secondsValue
	fs.VarP(&delay, "delay", "d", "-t: pause between the passes of multipleWrites (seconds, or a duration like 90s)")
	fs.IntVarP(&o.minPct, "minSizePercent", "y", defaultMinSizePercent, "-r: smallest truncate size, in `PERCENT` of the original size")
	fs.IntVarP(&o.maxPct, "maxSizePercent", "z", defaultMaxSizePercent, "-r: largest truncate size, in `PERCENT` of the original size")
	var duration secondsValue
	fs.Var(&duration, "duration", "-r: stop after this long (default: at SIGINT/SIGTERM)")
	fs.Uint64Var(&o.seed, "seed", 0, "-r, -w: random seed `N` (default: from the clock; printed)")
	fs.Int64Var(&o.ops, "ops", 0, "-r: stop after `N` operations (with --seed: replay a run)")
	fs.StringVar(&o.nbdCmd, "nbd-cmd", "dnbd3-nbd", "`CMD` that resizes a block device: CMD resize DEVICE SIZE")
	fs.BoolVar(&o.force, "force", false, "-c: overwrite an existing non-empty file or a device")
	fs.Int64Var(&o.l2, "l2-capacity", defaultL2Capacity, "scale every offset to this L2 capacity (for quick tests)")
	_ = fs.MarkHidden("l2-capacity")
	var wantHelp, wantVersion bool
	fs.BoolVarP(&wantHelp, "help", "h", false, "show this help (-h test, -h randomTest: details)")
	fs.BoolVar(&wantVersion, "version", false, "print the version and exit")

	if err := fs.Parse(args); err != nil {
		return o, false, err
	}
	if wantVersion {
		fmt.Fprintln(stdout, version.String())
		return o, true, nil
	}
	if wantHelp {
		topics := map[string]string{"": "", "test": helpTest, "randomTest": helpRandom}
		topic, ok := topics[fs.Arg(0)]
		if !ok || fs.NArg() > 1 {
			return o, true, fmt.Errorf("no help on %q (try -h test or -h randomTest)", strings.Join(fs.Args(), " "))
		}
		io.WriteString(stdout, usageText+fs.FlagUsages()+topic)
		return o, true, nil
	}

	var given []string
	for _, m := range modes {
		if fs.Changed(m.long) {
			given = append(given, "-"+m.short)
			o.mode = m.short
			o.paths = []string{*modeVals[m.short]}
		}
	}
	switch len(given) {
	case 0:
		return o, false, errors.New("no mode given: want one of -c, -t, -v, -r, -x, -w")
	case 1:
	default:
		return o, false, fmt.Errorf("only one mode at a time, got %s", strings.Join(given, " "))
	}
	if o.paths[0] == "" {
		return o, false, fmt.Errorf("-%s: empty path", o.mode)
	}
	rest := fs.Args()
	switch o.mode {
	case "c":
		if len(rest) > 1 {
			return o, false, fmt.Errorf("-c FILE [SIZE]: unexpected argument %q", rest[1])
		}
		o.genSize = -1 // the layout's testFileSize
		if len(rest) == 1 {
			n, err := units.ParseSize(rest[0])
			if err != nil {
				return o, false, fmt.Errorf("-c FILE [SIZE]: %w", err)
			}
			o.genSize = n
		}
	case "t", "v":
		if len(rest) > 0 {
			return o, false, fmt.Errorf("-%s FILE: unexpected argument %q", o.mode, rest[0])
		}
	default:
		if len(rest) != 1 || rest[0] == "" {
			return o, false, fmt.Errorf("-%s needs two paths, e.g. -%s A B", o.mode, o.mode)
		}
		o.paths = append(o.paths, rest[0])
	}

	// Flags that belong to other modes are mistakes.
	only := map[string]string{
		"delay": "t", "minSizePercent": "r", "maxSizePercent": "r", "duration": "r", "ops": "r",
		"seed": "rw", "force": "c",
	}
	for name, ms := range only {
		if fs.Changed(name) && !strings.Contains(ms, o.mode) {
			return o, false, fmt.Errorf("--%s does not apply to -%s", name, o.mode)
		}
	}
	o.delay, o.duration = time.Duration(delay), time.Duration(duration)
	o.seedSet = fs.Changed("seed")
	if o.minPct < 0 || o.maxPct > 1000 || o.minPct > o.maxPct {
		return o, false, fmt.Errorf("-y %d -z %d: want 0 <= -y <= -z <= 1000 (percent of the original size)", o.minPct, o.maxPct)
	}
	if o.ops < 0 {
		return o, false, fmt.Errorf("--ops %d: want a count >= 0", o.ops)
	}
	if o.lo, err = newLayout(o.l2); err != nil {
		return o, false, fmt.Errorf("--l2-capacity: %w", err)
	}
	return o, false, nil
}

// secondsValue is a flag that takes whole seconds (as the reference's -d)
// or a Go duration ("90s", "1m30s").
type secondsValue time.Duration

func (s *secondsValue) String() string {
	if *s == 0 {
		return "0"
	}
	return time.Duration(*s).String()
}

func (s *secondsValue) Type() string { return "SEC" }

func (s *secondsValue) Set(v string) error {
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		*s = secondsValue(time.Duration(n) * time.Second)
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return fmt.Errorf("want seconds or a duration like 90s")
	}
	*s = secondsValue(d)
	return nil
}

// run runs the command line and returns the exit code.
func run(ctx context.Context, args []string, e *env) int {
	o, help, err := parseArgs(args, e.stdout)
	if help && err == nil {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(e.stderr, "dnbd3-cowtest: %v\n", err)
		fmt.Fprintf(e.stderr, "Try dnbd3-cowtest --help.\n")
		return exitUsage
	}
	lo := o.lo
	if o.l2 != defaultL2Capacity {
		fmt.Fprintf(e.stdout, "note: scaled layout, l2 capacity %d: original size %d, final size %d\n", lo.l2, lo.testFileSize, lo.grown)
	}
	if !o.seedSet {
		o.seed = uint64(time.Now().UnixNano())
	}

	if o.mode == "c" {
		size := o.genSize
		if size < 0 {
			size = lo.testFileSize
		}
		g := &generate{ctx: ctx, e: e, path: o.paths[0], size: size, force: o.force, nbdCmd: o.nbdCmd, out: e.stdout}
		return g.run()
	}

	write := o.mode != "v" && o.mode != "x"
	var ts []target
	defer func() {
		for _, t := range ts {
			t.Close()
		}
	}()
	for _, p := range o.paths {
		t, err := e.open(p, write, o.nbdCmd)
		if err != nil {
			fmt.Fprintf(e.stdout, "dnbd3-cowtest: %v\n", err)
			return exitFailure
		}
		ts = append(ts, t)
		if t.IsDevice() {
			fmt.Fprintf(e.stdout, "%s: block device, logical block size %d, O_DIRECT I/O, resized with %q\n", p, t.BlockSize(), o.nbdCmd+" resize")
		}
	}

	switch o.mode {
	case "t":
		s := &standardTest{ctx: ctx, t: ts[0], lo: lo, delay: o.delay, out: e.stdout}
		return s.run()
	case "v":
		v := &verifier{ctx: ctx, t: ts[0], lo: lo, out: e.stdout}
		return v.run()
	case "r":
		r := &randomTest{
			ctx: ctx, final: e.final, mounted: ts[0], normal: ts[1],
			minPct: o.minPct, maxPct: o.maxPct, seed: o.seed,
			duration: o.duration, maxOps: o.ops, progress: e.progress, out: e.stdout,
		}
		return r.run()
	case "x":
		rep := newReporter(e.stdout)
		compareTargets(ctx, rep, ts[0], ts[1])
		return rep.finish("compare")
	case "w":
		s := &specialTest{ctx: ctx, a: ts[0], b: ts[1], seed: o.seed, out: e.stdout}
		return s.run()
	}
	return exitUsage
}
