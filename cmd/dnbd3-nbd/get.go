package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/logging"
	"github.com/dnbd3go/dnbd3go/internal/progress"
	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/protocol"
	"github.com/spf13/pflag"
)

// getOptions are the flags of "dnbd3-nbd get". Of the image flags it uses
// -h -i -r -S, --timeout and the log format and level (no -l).
type getOptions struct {
	imageFlags
	output    string
	offset    int64
	length    int64
	parallel  int
	blockSize int64
	quiet     bool
	reuse     string // a local copy of an earlier revision (getreuse.go)
}

func runGet(ctx context.Context, args []string, s stdio) int {
	var o getOptions
	var offset, length, blockSize string
	fs := pflag.NewFlagSet("dnbd3-nbd get", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(s.err)
	o.registerSource(fs)
	fs.StringVarP(&o.output, "output", "o", "-", `output file, "-" for stdout`)
	fs.StringVar(&offset, "offset", "0", "first byte to fetch (suffixes K, M, G, T = powers of 1024)")
	fs.StringVar(&length, "length", "0", "number of bytes to fetch (0 = to the end of the image)")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "fail when a read stays unanswered this long while no server is reachable (0 = wait forever)")
	fs.IntVar(&o.parallel, "parallel", 8, "reads in flight")
	fs.StringVar(&blockSize, "block-size", "1M", "size of each read")
	fs.StringVar(&o.reuse, "reuse", "", "local copy of an earlier revision: take its 16 MiB hash blocks whose CRC matches the server's CRC list instead of fetching them; every block is checked against the list")
	fs.BoolVarP(&o.quiet, "quiet", "q", false, "no progress bar and no summary")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format on stderr: text or json")
	fs.StringVar(&o.logLevel, "log-level", "warning", "minimum log level: error, warning, info, debug")
	addVersionFlag(fs)
	setHelp(fs, s, "Usage: dnbd3-nbd get -h \"HOST[:PORT] ...\" -i IMAGE [-r RID] [-S] [-o FILE|-] [--offset N] [--length N] [--reuse OLDFILE] [--timeout D]\n\n"+
		"Downloads an image (or a byte range of it) from DNBD3 servers to a file or stdout.\n"+
		"With --reuse, only the hash blocks that differ from OLDFILE (an earlier revision) are fetched.\n")
	if code, ok := parseFlags(fs, args, s, "get"); !ok {
		return code
	}
	bad := func(format string, a ...any) int {
		fmt.Fprintf(s.err, "dnbd3-nbd get: "+format+"\n", a...)
		return exitUsage
	}
	if err := o.validate(); err != nil {
		return bad("%v", err)
	}
	var err error
	if o.offset, err = units.ParseSize(offset); err != nil {
		return bad("--offset: %v", err)
	}
	if o.length, err = units.ParseSize(length); err != nil {
		return bad("--length: %v", err)
	}
	if o.blockSize, err = units.ParseSize(blockSize); err != nil || o.blockSize < 512 || o.blockSize > 64<<20 {
		return bad("--block-size %q: want 512 bytes to 64M", blockSize)
	}
	if o.parallel < 1 || o.parallel > 256 {
		return bad("--parallel %d: want 1 to 256", o.parallel)
	}
	if o.reuse != "" && (o.offset != 0 || o.length != 0) {
		return bad("--reuse works on whole images: no --offset or --length")
	}
	level, err := logging.ParseLevel(o.logLevel)
	if err != nil {
		return bad("--log-level: %v", err)
	}
	log, err := logging.Simple(s.err, o.logFormat, level)
	if err != nil {
		return bad("--log-format: %v", err)
	}
	if o.output == "-" && progress.IsTerminal(s.out) {
		return bad("refusing to write image data to a terminal: use -o FILE or redirect stdout")
	}
	res, err := get(ctx, o, s, log)
	if err != nil {
		fmt.Fprintf(s.err, "dnbd3-nbd get: %v\n", err)
		return exitError
	}
	printGetSummary(s, o, res)
	return exitOK
}

// printGetSummary prints what a finished download fetched (not with -q)
// and, with --reuse, what it reused (with -q too: it is what the admin
// asked about).
func printGetSummary(s stdio, o getOptions, res getResult) {
	if !o.quiet {
		el := res.elapsed.Seconds()
		fmt.Fprintf(s.err, "dnbd3-nbd get: %d bytes (%s) of %s rid %d in %.2fs (%s) from %s\n",
			res.bytes, progress.Bytes(res.bytes), res.image, res.rid, el, progress.Rate(res.bytes, res.elapsed), res.server)
	}
	if o.reuse == "" {
		return
	}
	checked := "every hash block checked against the server's CRC list"
	if !res.reuse.checked {
		checked = "nothing checked: the server has no CRC list"
	}
	fmt.Fprintf(s.err, "dnbd3-nbd get: reused %d bytes (%d of %d hash blocks) from %s, fetched %d bytes; %s\n",
		res.reuse.reused, res.reuse.reusedBlocks, res.reuse.blocks, o.reuse, res.reuse.fetched, checked)
}

// getResult describes a finished download.
type getResult struct {
	bytes   int64
	elapsed time.Duration
	image   string
	rid     uint16
	server  string
	reuse   reuseResult // with --reuse
}

// get downloads the range to o.output with o.parallel reads in flight,
// writing in order so stdout may be a pipe.
func get(ctx context.Context, o getOptions, s stdio, log *slog.Logger) (getResult, error) {
	start := time.Now()
	img, err := o.open(ctx, log)
	if err != nil {
		return getResult{}, err
	}
	defer img.Close()
	size := img.Size()
	if o.offset >= size {
		return getResult{}, fmt.Errorf("--offset %d is beyond the end of %s rid %d (%d bytes)", o.offset, img.Name(), img.RID(), size)
	}
	end := size
	if o.length > 0 {
		end = o.offset + o.length
		if end > size || end < o.offset {
			return getResult{}, fmt.Errorf("range %d+%d ends beyond the end of %s rid %d (%d bytes)", o.offset, o.length, img.Name(), img.RID(), size)
		}
	}

	var old *os.File
	var list []uint32
	if o.reuse != "" {
		if old, list, err = openReuse(ctx, o, img, log); err != nil {
			return getResult{}, err
		}
		defer old.Close()
	}
	out, finish, err := openOutput(o.output, s.out)
	if err != nil {
		return getResult{}, err
	}
	var bar *progress.Bar
	if !o.quiet {
		bar = progress.New(s.err, end-o.offset, img.Name())
	}
	var n int64
	var reused reuseResult
	if list != nil {
		reused, err = reuseCopy(ctx, img, old, out, list, int(o.blockSize), o.parallel, bar)
		n = reused.reused + reused.fetched
	} else {
		n, err = copyRange(ctx, img, out, o.offset, end, int(o.blockSize), o.parallel, bar)
		reused = reuseResult{fetched: n, blocks: protocol.HashBlockCount(size)}
	}
	if bar != nil {
		bar.Finish()
	}
	if ferr := finish(err == nil); err == nil && ferr != nil {
		err = ferr
	}
	if err != nil {
		return getResult{}, err
	}
	st := img.Stats()
	return getResult{bytes: n, elapsed: time.Since(start), image: img.Name(), rid: img.RID(), server: st.Current, reuse: reused}, nil
}

// openReuse opens --reuse's file and fetches the image's CRC list. A
// server without a list gets a warning and list nil: then everything is
// fetched (and nothing can be checked).
func openReuse(ctx context.Context, o getOptions, img *client.Image, log *slog.Logger) (*os.File, []uint32, error) {
	old, err := os.Open(o.reuse)
	if err != nil {
		return nil, nil, fmt.Errorf("--reuse: %w", err)
	}
	fail := func(err error) (*os.File, []uint32, error) { old.Close(); return nil, nil, err }
	ost, err := old.Stat()
	if err != nil {
		return fail(err)
	}
	if !ost.Mode().IsRegular() {
		return fail(fmt.Errorf("--reuse %s: not a regular file", o.reuse))
	}
	if o.output != "-" {
		if st, err := os.Stat(o.output); err == nil && os.SameFile(st, ost) {
			return fail(fmt.Errorf("--reuse %s is the output file: write the new revision to another file", o.reuse))
		}
	}
	list, err := img.CRCList(ctx)
	if err != nil {
		return fail(err)
	}
	if list == nil {
		log.Warn("the server has no CRC list for this image: nothing can be reused or checked, fetching everything", "image", img.Name(), "rid", img.RID())
	}
	return old, list, nil
}

// openOutput opens the destination. finish(ok) syncs and closes it; on
// failure it removes a regular file this call created.
func openOutput(path string, stdout io.Writer) (io.Writer, func(ok bool) error, error) {
	if path == "-" {
		return stdout, func(bool) error { return nil }, nil
	}
	fi, statErr := os.Stat(path)
	created := errors.Is(statErr, os.ErrNotExist)
	flags := os.O_WRONLY | os.O_CREATE
	if statErr != nil || fi.Mode().IsRegular() {
		flags |= os.O_TRUNC // a device is written over, not truncated
	}
	f, err := os.OpenFile(path, flags, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("open output: %w", err)
	}
	return f, func(ok bool) error {
		var err error
		if ok && (created || fi.Mode().IsRegular()) {
			err = f.Sync() // devices, /dev/null and FIFOs need no (or refuse) fsync
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if !ok && created {
			os.Remove(path)
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		return nil
	}, nil
}

type chunk struct {
	off  int64
	buf  []byte
	err  error
	done chan struct{}
}

// copyRange reads [start, end) of img with parallel pipelined reads and
// writes it to w in order. It returns the bytes written.
func copyRange(ctx context.Context, img *client.Image, w io.Writer, start, end int64, bs, parallel int, bar *progress.Bar) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	free := make(chan []byte, parallel+2)
	for range parallel + 2 {
		free <- make([]byte, bs)
	}
	order := make(chan *chunk, parallel)
	work := make(chan *chunk, parallel)
	go func() { // producer
		defer close(order)
		defer close(work)
		for off := start; off < end; off += int64(bs) {
			var buf []byte
			select {
			case buf = <-free:
			case <-ctx.Done():
				return
			}
			c := &chunk{off: off, buf: buf[:min(int64(bs), end-off)], done: make(chan struct{})}
			order <- c // cap parallel, drained by the writer
			work <- c
		}
	}()
	workers := make(chan struct{})
	for range parallel {
		go func() {
			defer func() { workers <- struct{}{} }()
			for c := range work {
				_, c.err = img.ReadAtContext(ctx, c.buf, c.off)
				close(c.done)
			}
		}()
	}
	var written int64
	var firstErr error
	for c := range order {
		<-c.done
		if firstErr == nil && c.err != nil {
			firstErr = c.err
			cancel()
		}
		if firstErr == nil {
			if _, err := w.Write(c.buf); err != nil {
				firstErr = fmt.Errorf("write output: %w", err)
				cancel()
			} else {
				written += int64(len(c.buf))
				if bar != nil {
					bar.Add(int64(len(c.buf)))
				}
			}
		}
		free <- c.buf[:cap(c.buf)]
	}
	for range parallel {
		<-workers
	}
	if firstErr == nil && ctx.Err() != nil {
		firstErr = context.Cause(ctx)
	}
	return written, firstErr
}
