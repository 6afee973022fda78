// Command dnbd3-merger is the merger service for dnbd3 copy-on-write
// sessions: clients upload the clusters they changed, and on request the
// service merges them with the original image into its next revision.
//
// It speaks the REST API of the reference cow_merger_service (both the
// current /v1/File/* and the 2022 /api/File/* generation, see
// merger/httpapi) and reads its appsettings.json, so it can replace it:
//
//	dnbd3-merger --settings /etc/dnbd3-merger/appsettings.json [--token-file FILE]
//
// From the settings file it takes Settings.WorkingDirectory,
// Settings.OriginalImageDirectory, Settings.DestinationDirectory (relative
// paths are resolved against the working directory of the process, as the
// reference does) and Urls (a semicolon-separated list such as
// "http://localhost:5000;http://0.0.0.0:5001"), and from dnbd3go's own
// section "Limits" the bounds on what clients can make it hold (uploads
// and connections at once, sessions in total and per image, open
// sessions, the quota of a session, how long an empty session is kept:
// see limits.go and examples/merger/appsettings.json); other keys are
// ignored. Flags override the file. SIGTERM or SIGINT stops it cleanly: requests in
// flight finish, the sessions are saved, merges in progress resume at the
// next start.
//
// Exit codes: 0 after a clean stop, 1 for a configuration or runtime
// error, 2 for a bad command line.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/logging"
	"github.com/dnbd3go/dnbd3go/internal/sdnotify"
	"github.com/dnbd3go/dnbd3go/internal/version"
	"github.com/dnbd3go/dnbd3go/merger"
	"github.com/dnbd3go/dnbd3go/merger/httpapi"
	"github.com/spf13/pflag"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

func main() {
	ctx, stop := signalContext()
	code := run(ctx, os.Args[1:], env{stdout: os.Stdout, stderr: os.Stderr, open: openManager})
	stop()
	os.Exit(code)
}

// signalContext is cancelled by SIGTERM or SIGINT.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

// env is what run needs from its surroundings; tests replace parts.
type env struct {
	stdout, stderr io.Writer
	// open starts the merge engine (openManager).
	open openFunc
	// cwd resolves relative paths; "" means the process's working
	// directory.
	cwd string
	// ready, if set, is called with the listen addresses once the server
	// accepts requests.
	ready func(addrs []net.Addr)
}

// run parses the command line and runs the service until ctx ends. It
// returns the exit code.
func run(ctx context.Context, args []string, e env) int {
	f := flags{helpOut: e.stdout}
	fs := newFlagSet(&f, e.stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK
		}
		fmt.Fprintln(e.stderr, "dnbd3-merger:", err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(e.stderr, "dnbd3-merger: unexpected argument %q (see --help)\n", fs.Arg(0))
		return exitUsage
	}
	if f.version {
		fmt.Fprintln(e.stdout, version.String())
		return exitOK
	}
	cwd := e.cwd
	if cwd == "" {
		var err error
		if cwd, err = os.Getwd(); err != nil {
			fmt.Fprintln(e.stderr, "dnbd3-merger:", err)
			return exitError
		}
	}
	cfg, err := buildConfig(&f, cwd)
	if err != nil {
		fmt.Fprintln(e.stderr, "dnbd3-merger:", err)
		if errors.As(err, new(usageError)) {
			return exitUsage
		}
		return exitError
	}
	log, err := logging.Simple(e.stderr, cfg.logFormat, cfg.logLevel)
	if err != nil {
		fmt.Fprintln(e.stderr, "dnbd3-merger:", err)
		return exitUsage
	}
	return serve(ctx, cfg, log, e)
}

// serve opens the listeners and the merge engine, serves until ctx ends
// and shuts down: no new connections, requests in flight finish (up to
// the shutdown timeout), then the engine is closed.
func serve(ctx context.Context, cfg config, log *slog.Logger, e env) int {
	token, err := loadToken(cfg, log)
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitError
	}
	tlsCfg, err := loadTLS(cfg)
	if err != nil {
		log.Error("cannot start: TLS certificate", "cert", cfg.tlsCert, "key", cfg.tlsKey, "err", err)
		return exitError
	}
	log.Info("starting", "version", version.String(), "settings", cfg.settingsFile,
		"workingDirectory", cfg.workingDir, "originalImageDirectory", cfg.originalDir,
		"destinationDirectory", cfg.destinationDir)
	nofile, err := descriptorLimit()
	if err == nil {
		err = fitDescriptors(&cfg.limits, cfg.maxMerges, nofile, log)
	}
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitError
	}
	warnExposed(log, cfg.urls, token)
	lns, err := listenAll(ctx, cfg.urls, log)
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitError
	}
	svc, err := e.open(ctx, mergerConfig(cfg, log))
	if err != nil {
		for _, l := range lns {
			l.Close()
		}
		log.Error("cannot start the merger", "err", err)
		return exitError
	}
	srv := newHTTPServer(cfg, svc, token, tlsCfg, log)
	errc := serveListeners(srv, lns, newConnSlots(cfg.limits.maxConnections), e, log)
	// systemd (Type=notify): ready once listening, then status lines.
	sd := sdnotify.Start(ctx, sdnotify.Options{Status: statusLine(svc), Logger: log})
	defer sd.Stop()

	code := exitOK
	select {
	case <-ctx.Done():
		log.Info("shutting down: finishing the requests in flight", "timeout", cfg.shutdown)
	case err := <-errc:
		log.Error("server failed", "err", err)
		code = exitError
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.shutdown)
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("requests still running after the shutdown timeout; closing their connections", "err", err)
		_ = srv.Close()
	}
	cancel()
	if err := svc.Close(); err != nil {
		log.Error("closing the merger", "err", err)
		code = exitError
	}
	log.Info("stopped")
	return code
}

// loadTLS loads the certificate for https:// URLs (nil without one).
func loadTLS(cfg config) (*tls.Config, error) {
	if cfg.tlsCert == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.tlsCert, cfg.tlsKey)
	if err != nil {
		return nil, err
	}
	// NextProtos names h2 so that HTTP/2 is set up whichever listener
	// starts first: a plain Serve that wins http.Server's one-time setup
	// configures HTTP/2 only if TLSConfig mentions it, while ServeTLS
	// offers h2 regardless, and h2 clients got a dropped connection.
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert},
		NextProtos: []string{"h2", "http/1.1"}}, nil
}

// mergerConfig is the merger service's configuration from the settings.
func mergerConfig(cfg config, log *slog.Logger) merger.Config {
	return merger.Config{
		WorkingDirectory:       cfg.workingDir,
		OriginalImageDirectory: cfg.originalDir,
		DestinationDirectory:   cfg.destinationDir,
		Retention:              cfg.retention,
		AbandonAfter:           cfg.abandonAfter,
		MaxConcurrentMerges:    cfg.maxMerges,
		MinFreeSpace:           cfg.minFreeSpace,
		MaxSessions:            cfg.limits.maxSessions,
		MaxSessionsPerImage:    cfg.limits.maxSessionsPerImage,
		MaxOpenSessions:        cfg.limits.maxOpenSessions,
		SessionQuota:           cfg.limits.sessionQuota,
		AbandonEmptyAfter:      cfg.limits.abandonEmptyAfter,
		Logger:                 log,
	}
}

// newHTTPServer is the HTTP server of both APIs, with bounded headers,
// bodies and connection times.
func newHTTPServer(cfg config, svc service, token string, tlsCfg *tls.Config, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler: httpapi.New(svc, httpapi.Options{Token: token, Logger: log,
			MaxUploads: cfg.limits.maxUploads, MaxUploadsPerClient: cfg.limits.maxUploadsPerClient,
			UploadTimeout: cfg.limits.uploadTimeout,
			Metrics:       metricsRegistry(svc), OpenMetrics: cfg.metricsNoAuth,
			StatusPage: true, Version: version.String()}),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 20 * time.Second,
		// Forms are at most 64 KiB; an upload's body gets its own deadline
		// (--upload-timeout) once it is admitted, after waiting up to 10 s.
		ReadTimeout:    time.Minute,
		WriteTimeout:   10 * time.Minute,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 64 << 10,
		// Handshake failures and the like are client problems.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
}

// serveListeners serves srv on every listener (through the shared
// connection slots) and returns the channel of their errors.
func serveListeners(srv *http.Server, lns []boundListener, slots *connSlots, e env, log *slog.Logger) <-chan error {
	errc := make(chan error, len(lns))
	addrs := make([]net.Addr, 0, len(lns))
	for _, l := range lns {
		log.Info("listening", "url", l.url.raw, "addr", l.Addr().String())
		addrs = append(addrs, l.Addr())
		ll := &limitedListener{Listener: l, slots: slots, plain: !l.url.tls()}
		go func() {
			if l.url.tls() {
				errc <- srv.ServeTLS(ll, "", "")
			} else {
				errc <- srv.Serve(ll)
			}
		}()
	}
	if e.ready != nil {
		e.ready(addrs)
	}
	return errc
}

// statusLine returns svc's status line function for systemd, if it has
// one (the real merger.Manager does).
func statusLine(svc service) func() string {
	if s, ok := svc.(interface{ StatusLine() string }); ok {
		return s.StatusLine
	}
	return nil
}

// warnExposed warns about listen URLs reachable from other hosts that
// are not protected: without a token anyone may use the service, and with
// a token on plain http the token crosses the network in clear text.
func warnExposed(log *slog.Logger, urls []listenURL, token string) {
	for _, u := range urls {
		if u.isLoopback() {
			continue
		}
		if token == "" {
			log.Warn("no --token-file: anyone who can reach this address can create sessions, upload and merge",
				"url", u.raw)
			return
		}
		if !u.tls() {
			log.Warn("the bearer token crosses the network in clear text on this plain http address: anyone who can watch the traffic can use it; "+
				"listen on https:// (--tls-cert, --tls-key), or on loopback behind a TLS proxy", "url", u.raw)
		}
	}
}

// loadToken reads the bearer token file, if any, warning if every user
// can read it.
func loadToken(cfg config, log *slog.Logger) (string, error) {
	if cfg.tokenFile == "" {
		return "", nil
	}
	tok, worldReadable, err := readToken(cfg.tokenFile)
	if err != nil {
		return "", err
	}
	if worldReadable {
		log.Warn("the token file is readable by every user: restrict it (chmod 600 or 640)", "file", cfg.tokenFile)
	}
	return tok, nil
}
