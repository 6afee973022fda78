package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/logging"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

// imageFlags are the flags every command that reads an image shares, named
// as in the reference client (-h hosts, -i image, -r rid, -S sticky, -l log).
type imageFlags struct {
	hosts     string
	image     string
	rid       uint16
	sticky    bool
	timeout   time.Duration
	logFile   string
	logFormat string
	logLevel  string
	debug     bool
}

// newImageFlagSet returns the flag set of a command that serves an image
// (attach, serve): the image flags, then the copy-on-write flags.
func newImageFlagSet(name string, s stdio, f *imageFlags, cow *cowFlags) *pflag.FlagSet {
	fs := pflag.NewFlagSet("dnbd3-nbd "+name, pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(s.err)
	fs.SetNormalizeFunc(referenceAliases)
	f.register(fs)
	cow.register(fs)
	addVersionFlag(fs)
	return fs
}

// registerSource registers the flags that name the image and its servers
// (-h -i -r -S).
func (f *imageFlags) registerSource(fs *pflag.FlagSet) {
	fs.StringVarP(&f.hosts, "host", "h", "", `servers, space-separated: "host[:port] [v6]:port ..." (default port 5003)`)
	fs.StringVarP(&f.image, "image", "i", "", "image name")
	fs.Uint16VarP(&f.rid, "rid", "r", 0, "revision (0 = latest)")
	fs.BoolVarP(&f.sticky, "sticky", "S", false, "use only the given servers, don't learn others via GET_SERVERS")
}

func (f *imageFlags) register(fs *pflag.FlagSet) {
	f.registerSource(fs)
	fs.DurationVar(&f.timeout, "timeout", time.Minute, "a read fails (EIO) after waiting this long with no server answering (0 = wait forever)")
	fs.StringVarP(&f.logFile, "log", "l", "", "also write the log to this file")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "minimum log level: error, warning, info, debug")
	fs.BoolVarP(&f.debug, "debug", "d", false, "debug logging: --log-level debug (the reference client's -d)")
}

func (f *imageFlags) validate() error {
	if f.hosts == "" || f.image == "" {
		return errors.New("-h HOSTS and -i IMAGE are required (see --help)")
	}
	if f.timeout < 0 {
		return errors.New("--timeout must not be negative")
	}
	return nil
}

// validateWithCOW checks the image flags together with the copy-on-write
// flags. A session loaded with -L fixes the revision: unchanged blocks must
// come from the session's revision, not the latest.
func (f *imageFlags) validateWithCOW(cow *cowFlags) error {
	if err := f.validate(); err != nil {
		return err
	}
	if err := cow.validate(); err != nil {
		return err
	}
	rid, err := cow.sessionRID()
	switch {
	case err != nil:
		return fmt.Errorf("-L: %w", err)
	case rid != 0 && f.rid != 0 && rid != f.rid:
		return fmt.Errorf("-L: the session is based on revision %d, not -r %d", rid, f.rid)
	case rid != 0:
		f.rid = rid
	}
	return nil
}

// logger builds the command's logger: stderr, plus the -l file.
func (f *imageFlags) logger(stderr io.Writer) (*slog.Logger, func(), error) {
	level, err := logging.ParseLevel(f.logLevel)
	if err != nil {
		return nil, nil, fmt.Errorf("--log-level: %w", err)
	}
	if f.debug {
		level = slog.LevelDebug
	}
	mask := logging.MaskAtLeast(level)
	lg, err := logging.New(logging.Options{Format: f.logFormat, Console: stderr, ConsoleMask: mask,
		File: f.logFile, FileMask: mask, Timestamps: true})
	if err != nil {
		return nil, nil, err
	}
	return lg.Logger, func() { lg.Close() }, nil
}

// open connects to the image.
func (f *imageFlags) open(ctx context.Context, log *slog.Logger) (*client.Image, error) {
	return client.Open(ctx, client.Config{
		Servers:  []string{f.hosts},
		Image:    f.image,
		RID:      f.rid,
		Sticky:   f.sticky,
		Deadline: f.timeout,
		Logger:   log,
	})
}

// remoteWorkers is the engine's worker count for remote images: each worker
// may wait on the network, and the client library pipelines their reads.
const remoteWorkers = 128

// imageBackend serves a remote image read-only.
type imageBackend struct{ img *client.Image }

func (b imageBackend) ReadAt(p []byte, off int64) (int, error) { return b.img.ReadAt(p, off) }
func (b imageBackend) WriteAt([]byte, int64) (int, error)      { return 0, nbdbridge.ErrReadOnly }
func (b imageBackend) Size() int64                             { return b.img.Size() }
func (b imageBackend) Flush() error                            { return nil }
func (b imageBackend) ReadOnly() bool                          { return true }

// StartRead and SendStarted make the engine's reads asynchronous
// (nbdbridge.AsyncReader): no goroutine hand-off per request.
func (b imageBackend) StartRead(p []byte, off int64, t nbdbridge.ReadTarget) {
	b.img.StartRead(p, off, t)
}
func (b imageBackend) SendStarted() { b.img.SendStarted() }

// exitWith prints err for command name and returns the exit code.
func exitWith(s stdio, name string, err error) int {
	fmt.Fprintf(s.err, "dnbd3-nbd %s: %v\n", name, err)
	return exitError
}
