// Command dnbd3-server serves read-only disk images over the DNBD3 protocol.
// It is a drop-in for the reference server: same configuration directory,
// same flags, same wire protocol and RPC.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/logging"
	"github.com/dnbd3go/dnbd3go/internal/sdnotify"
	"github.com/dnbd3go/dnbd3go/internal/units"
	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/dnbd3go/dnbd3go/server"
	"github.com/spf13/pflag"
)

// daemonEnv marks the re-executed background child.
const daemonEnv = "DNBD3GO_DAEMON_CHILD"

func main() {
	os.Exit(run(os.Args[1:]))
}

type flags struct {
	configDir  string
	foreground bool
	bind       string
	crcFile    string
	create     string
	revision   uint16
	size       string
	errorMsg   string
	logFormat  string
	showVer    bool
	check      bool
	allowOpen  bool
}

func run(args []string) int {
	f, code, ok := parseFlags(args)
	if !ok {
		return code
	}
	if code, done := oneShot(f); done {
		return code
	}
	dir := readConfigDir(f)
	if dir == nil {
		return 1
	}
	cfg := dir.Config
	if !f.foreground && os.Getenv(daemonEnv) == "" {
		return daemonize(args)
	}
	lg, err := logging.New(logging.Options{
		Format:      f.logFormat,
		Console:     os.Stdout,
		ConsoleMask: cfg.LogConsoleMask,
		File:        cfg.LogFile,
		FileMask:    cfg.LogFileMask,
		Timestamps:  cfg.ConsoleTimestamps,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "dnbd3-server:", err)
		return 1
	}
	defer lg.Close()
	return serve(f, dir, lg)
}

// parseFlags parses the command line; ok is false when the program ends
// here with code (--help, a bad flag).
func parseFlags(args []string) (f flags, code int, ok bool) {
	fs := pflag.NewFlagSet("dnbd3-server", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVarP(&f.configDir, "config", "c", "/etc/dnbd3-server", "configuration directory (server.conf, alt-servers, rpc.acl)")
	fs.BoolVarP(&f.foreground, "nodaemon", "n", false, "stay in the foreground (default: detach into the background)")
	fs.StringVarP(&f.bind, "bind", "b", "", "bind address (default: all addresses)")
	fs.StringVar(&f.crcFile, "crc", "", "one-shot: write FILE.crc for an image file and exit")
	fs.StringVar(&f.create, "create", "", "one-shot: create an empty image NAME (with --revision and --size) below basePath and exit")
	fs.Uint16Var(&f.revision, "revision", 0, "revision for --create")
	fs.StringVar(&f.size, "size", "", "size in bytes for --create (suffixes K, M, G, T: powers of 1024; 4M, 4MiB and 4m are all 4 MiB)")
	fs.StringVar(&f.errorMsg, "errormsg", "", "answer every connection with an HTTP JSON error message TEXT and nothing else")
	fs.StringVar(&f.logFormat, "log-format", "text", "console log format: text or json")
	fs.BoolVar(&f.check, "check-config", false, "check the configuration directory (as the user the server runs as), print every problem and exit: 1 if the server would not start")
	fs.BoolVar(&f.allowOpen, "allow-open-rpc", false, "start even if rpc.acl has rule lines but none is valid (the RPC is then open to everyone, as in the reference)")
	fs.BoolVarP(&f.showVer, "version", "v", false, "print the version and exit")
	fs.Usage = func() { // --help: output asked for, on stdout
		fmt.Fprintf(os.Stdout, "Usage: dnbd3-server [-n] [-c DIR] [-b ADDR]\n       dnbd3-server --check-config [-c DIR]\n       dnbd3-server --crc FILE\n       dnbd3-server -c DIR --create NAME --revision N --size BYTES\n\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return f, 0, false
		}
		fmt.Fprintln(os.Stderr, "dnbd3-server:", err)
		return f, 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "dnbd3-server: unexpected argument %q\n", fs.Arg(0))
		return f, 2, false
	}
	return f, 0, true
}

// serve starts the server with the checked configuration and runs it
// until SIGTERM or SIGINT.
func serve(f flags, dir *server.ConfigDir, lg *logging.Logger) int {
	cfg := dir.Config
	log := lg.Logger
	for _, p := range dir.Problems {
		log.Warn(p.Msg, "at", p.Where())
	}
	log.Info("starting", "version", version.String(), "config", f.configDir, "basePath", cfg.BasePath)
	srv, err := server.New(server.Options{
		ConfigDir: f.configDir,
		Config:    cfg,
		Logger:    log,
		LogTail:   lg.Tail,
		Version:   version.String(),
		Files:     dir,
	})
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	addr := net.JoinHostPort(f.bind, strconv.Itoa(int(cfg.ListenPort)))
	ln, err := server.Listen(addr)
	if err != nil {
		log.Error("cannot listen", "addr", addr, "err", err)
		return 1
	}
	log.Info("listening", "addr", ln.Addr().String())

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	go handleSignals(ctx, sigs, srv, lg)
	// systemd (Type=notify): ready once listening, then status lines.
	sd := sdnotify.Start(ctx, sdnotify.Options{Status: srv.StatusLine, Logger: log})
	err = srv.Serve(ctx, ln)
	sd.Stop()
	signal.Stop(sigs)
	close(sigs)
	if err != nil {
		log.Error("server stopped", "err", err)
		return 1
	}
	log.Info("shut down cleanly")
	return 0
}

// handleSignals runs the reference's signal actions until sigs closes:
// SIGHUP reloads, SIGUSR1 verifies every image, SIGUSR2 reopens the log.
func handleSignals(ctx context.Context, sigs <-chan os.Signal, srv *server.Server, lg *logging.Logger) {
	log := lg.Logger
	for sig := range sigs {
		switch sig {
		case syscall.SIGHUP:
			log.Info("SIGHUP received, reloading configuration and images")
			if err := srv.Reload(); err != nil {
				log.Error("reload failed", "err", err)
			}
		case syscall.SIGUSR1:
			log.Info("SIGUSR1 received, verifying checksum of all images...")
			go srv.VerifyAll(ctx)
		case syscall.SIGUSR2:
			if err := lg.Reopen(); err != nil {
				log.Error("cannot reopen log file", "err", err)
			} else {
				log.Info("SIGUSR2 received, log file reopened")
			}
		}
	}
}

// oneShot runs the modes that do something and exit instead of serving
// (--version, --crc, --check-config, --create, --errormsg); done is false
// for a normal start.
func oneShot(f flags) (code int, done bool) {
	switch {
	case f.showVer:
		fmt.Println(version.String())
		return 0, true
	case f.crcFile != "":
		list, err := server.WriteCRCFile(f.crcFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dnbd3-server: --crc:", err)
			return 1, true
		}
		fmt.Printf("wrote %s.crc (%d hash blocks)\n", f.crcFile, len(list))
		return 0, true
	case f.check:
		return checkConfig(f), true
	case f.create == "" && f.errorMsg == "":
		return 0, false
	}
	cfg, _, err := server.LoadConfig(f.configDir, nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dnbd3-server: %v\n", err)
		return 1, true
	}
	if f.create != "" {
		return create(cfg, f), true
	}
	return errorMode(cfg, f), true
}

// checkConfig is --check-config: every problem of the configuration
// directory on stdout, exit status 1 if one of them would stop a start.
func checkConfig(f flags) int {
	d := server.ReadConfigDir(f.configDir, server.CheckOptions{AllowOpenRPC: f.allowOpen})
	errs := 0
	for _, p := range d.Problems {
		fmt.Println(p)
		if p.Severity == server.SeverityError {
			errs++
		}
	}
	warns := len(d.Problems) - errs
	if errs > 0 {
		fmt.Printf("%s: %s, %s: dnbd3-server would not start\n", f.configDir, plural(errs, "error"), plural(warns, "warning"))
		return 1
	}
	fmt.Printf("%s: OK, %s\n", f.configDir, plural(warns, "warning"))
	return 0
}

// readConfigDir reads and checks the configuration directory for a start.
// With errors it prints them and returns nil; the warnings are left for
// the log.
func readConfigDir(f flags) *server.ConfigDir {
	d := server.ReadConfigDir(f.configDir, server.CheckOptions{AllowOpenRPC: f.allowOpen})
	if d.Err() == nil {
		return d
	}
	for _, p := range d.Problems {
		if p.Severity == server.SeverityError {
			fmt.Fprintln(os.Stderr, "dnbd3-server:", p)
		}
	}
	fmt.Fprintf(os.Stderr, "dnbd3-server: not starting; `dnbd3-server --check-config -c %s` lists every problem\n", f.configDir)
	return nil
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}

func create(cfg server.Config, f flags) int {
	if f.revision == 0 || f.size == "" {
		fmt.Fprintln(os.Stderr, "dnbd3-server: --create needs --revision N (1..65535) and --size BYTES")
		return 2
	}
	size, err := units.ParseSize(f.size)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dnbd3-server: --size: %v\n", err)
		return 2
	}
	path, err := server.CreateImage(cfg.BasePath, f.create, f.revision, size, cfg.SparseFiles, cfg.IgnoreAllocErrors)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dnbd3-server: --create:", err)
		return 1
	}
	fmt.Printf("created %s\n", path)
	return 0
}

// daemonize starts this program again in a new session with stdio on
// /dev/null (the reference calls daemon()) and returns once it runs.
func daemonize(args []string) int {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "dnbd3-server: cannot daemonize:", err)
		return 1
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), daemonEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "dnbd3-server: cannot daemonize:", err)
		return 1
	}
	// Report an immediate failure (bad config, port in use) instead of
	// pretending success.
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		fmt.Fprintf(os.Stderr, "dnbd3-server: background process exited at once (%v); run with -n to see why\n", err)
		return 1
	case <-time.After(500 * time.Millisecond):
	}
	fmt.Fprintf(os.Stderr, "dnbd3-server running in the background, pid %d\n", cmd.Process.Pid)
	return 0
}

// errorMode answers every connection with HTTP 200 "Somewhat OK" and a JSON
// error message, as the reference's --errormsg does.
func errorMode(cfg server.Config, f flags) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	addr := net.JoinHostPort(f.bind, strconv.Itoa(int(cfg.ListenPort)))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error("cannot listen", "addr", addr, "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := server.ServeErrorMessage(ctx, ln, f.errorMsg); err != nil {
		log.Error("stopped", "err", err)
		return 1
	}
	return 0
}
