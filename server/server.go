// Package server implements dnbd3-server: it serves read-only images
// `<name>.r<rid>` below a base path over the DNBD3 protocol and answers the
// HTTP JSON RPC on the same port. It reads the reference server's
// configuration directory (server.conf, alt-servers, rpc.acl).
package server

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/server/iscsi"
)

// Options configures a Server.
type Options struct {
	// ConfigDir is the configuration directory (server.conf, alt-servers,
	// rpc.acl). It is re-read on Reload. Empty: no files (an embedded
	// server configured by Config alone, with no alt-servers and no
	// rpc.acl rules).
	ConfigDir string
	// Config is the parsed server.conf.
	Config Config
	// Logger receives the server's logs.
	Logger *slog.Logger
	// LogTail returns the last bytes of the log file for RPC q=logfile
	// (nil: no log file).
	LogTail func(n int) []byte
	// Version is reported by RPC q=version.
	Version string
	// Files, if set, is ConfigDir as ReadConfigDir read and checked it
	// for this start: New takes the alt servers and the RPC access list
	// from it. Otherwise New reads alt-servers and rpc.acl itself, logs
	// their warnings and runs the same checks on Config, failing on
	// errors.
	Files *ConfigDir
	// AllowOpenRPC accepts an rpc.acl without a valid rule when New reads
	// the files itself (see CheckOptions).
	AllowOpenRPC bool
}

// Server is a DNBD3 server. Create it with New and run it with Serve.
type Server struct {
	opts  Options
	log   *slog.Logger
	store *store
	alts  []*altServer
	acl   *ACL
	rpc   *rpcServer

	cfg atomic.Pointer[Config] // replaced whole on Reload, never changed

	runID     uint64
	started   time.Time
	bytesSent atomic.Uint64 // served to clients, relayed data included
	bytesRecv atomic.Uint64 // received from uplinks
	// bytesReused counts bytes of replicated images copied from a
	// previous revision on this server instead of fetched (reuse.go).
	bytesReused atomic.Uint64
	met         serverMetrics // Prometheus counters (metrics.go)

	batches   batchPool // reply batch buffers (batch.go)
	pipes     pipePool  // pipes for large replies (splice.go)
	fetchBufs bufPool   // proxy fetch buffers (bufpool.go)
	proxy     *proxy    // uplinks, replication, cache map saving
	iscsi     *iscsi.Target
	checker   *checker // background hash block checks
	hooks     proxyHooks
	listen    syncValue[netip.AddrPort]

	connMu  sync.Mutex
	conns   map[net.Conn]struct{} // every accepted connection
	clients map[*clientConn]struct{}
	wg      sync.WaitGroup
	// dataConns counts DNBD3 and iSCSI connections, which maxClients
	// bounds; RPC connections have their own slots (rpc.go).
	dataConns atomic.Int64
}

// rpcReserve is how many connections beyond maxClients are accepted so
// that the RPC, metrics and status page stay reachable on a full server.
// Such a connection must show its protocol within fullFirstByte.
const (
	rpcReserve    = 64
	fullFirstByte = time.Second
)

// New loads the alt-servers and rpc.acl files, scans the base path and
// returns a server ready to Serve.
func New(opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		opts:    opts,
		log:     opts.Logger,
		runID:   rand.Uint64() >> 1,
		started: time.Now(),
		conns:   map[net.Conn]struct{}{},
		clients: map[*clientConn]struct{}{},
	}
	cfg := opts.Config
	s.cfg.Store(&cfg)
	files := opts.Files
	if files == nil {
		files = &ConfigDir{Dir: opts.ConfigDir, Config: opts.Config}
		files.readAux()
		files.check(CheckOptions{AllowOpenRPC: opts.AllowOpenRPC}, func(string, string) int { return 0 })
		for _, p := range files.Problems {
			if p.Severity == severityWarning {
				s.log.Warn(p.Msg, "at", p.Where())
			}
		}
		if err := files.Err(); err != nil {
			return nil, err
		}
	}
	s.alts, s.acl = files.AltServers, files.ACL
	s.checker = newChecker(s)
	s.proxy = newProxy(s)
	s.store = newStore(storeOptions{
		BasePath:      opts.Config.BasePath,
		VMDKLegacy:    opts.Config.VMDKLegacyMode,
		RemoveMissing: opts.Config.RemoveMissingImages,
		MaxImages:     opts.Config.MaxImages,
		Logger:        s.log,
		OnLoad:        s.onLoad,
	})
	added, _, _, err := s.store.reload()
	if err != nil {
		return nil, err
	}
	s.log.Info("images loaded", "count", added, "basePath", opts.Config.BasePath)
	s.iscsi = s.newISCSITarget()
	if opts.Config.ISCSIServer {
		s.log.Info("iSCSI target enabled on the listen port (iScsiServer=true)")
	} else {
		s.log.Info("iSCSI target disabled (iScsiServer=false): iSCSI logins are closed")
	}
	s.rpc = newRPCServer(s)
	return s, nil
}

// config returns the current configuration (read-only: Reload replaces
// it with a new one).
func (s *Server) config() *Config { return s.cfg.Load() }

// Listen opens a TCP listener for Serve. Accepted connections get no TCP
// keepalive probes (the protocol has its own keepalive and timeouts), which
// saves four system calls per connection.
func Listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	return lc.Listen(context.Background(), "tcp", addr)
}

// Serve accepts connections on ln until ctx is cancelled, then closes every
// connection and returns once all handlers have finished.
//
// On shutdown, relays and replication stop, uplinks close, and the cache
// maps and `.meta` files of incomplete and replicated images are saved
// before Serve returns.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.listen.store(addrPort(ln.Addr()))
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		s.proxy.abort()
	})
	defer stop()
	bgCtx, bgCancel := context.WithCancel(context.Background())
	defer bgCancel()
	s.checker.run(bgCtx)
	s.proxy.start()
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.rpc.serve() }()
	var tempDelay time.Duration
	var err error
	for {
		var c net.Conn
		c, err = ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				err = nil
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed, retrying", "err", err, "delay", tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			break
		}
		tempDelay = 0
		if !s.track(c) {
			s.log.Warn("rejecting connection: maxClients reached (and the RPC reserve is in use)", "remote", c.RemoteAddr())
			c.Close()
			continue
		}
		s.wg.Add(1)
		go s.handle(c)
	}
	ln.Close()
	s.rpc.close()
	s.connMu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.connMu.Unlock()
	s.wg.Wait()
	s.pipes.close()
	bgCancel()
	s.checker.wait()
	s.proxy.stop()
	return err
}

// listenAddr returns the address Serve listens on (invalid before Serve).
func (s *Server) listenAddr() netip.AddrPort { return s.listen.load() }

// full reports whether maxClients DNBD3 and iSCSI connections are open.
func (s *Server) full() bool {
	max := s.config().MaxClients
	return max > 0 && s.dataConns.Load() >= int64(max)
}

// takeDataConn counts a DNBD3 or iSCSI connection; false if maxClients
// are open.
func (s *Server) takeDataConn() bool {
	max := int64(s.config().MaxClients)
	for {
		n := s.dataConns.Load()
		if max > 0 && n >= max {
			return false
		}
		if s.dataConns.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// track registers a connection; false if maxClients plus the RPC
// reserve is reached.
func (s *Server) track(c net.Conn) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if max := s.config().MaxClients; max > 0 && len(s.conns) >= max+rpcReserve {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.connMu.Lock()
	delete(s.conns, c)
	s.connMu.Unlock()
}

// handle detects the protocol from the first byte: 0x73 ("sr" magic) is
// DNBD3, 'G' or 'P' is the HTTP RPC, 0x43 (a login request with the
// immediate bit) is iSCSI unless iScsiServer=false; anything else is
// closed.
func (s *Server) handle(c net.Conn) {
	defer s.wg.Done()
	handedOff := false
	defer func() {
		if !handedOff {
			c.Close()
			s.untrack(c)
		}
	}()
	timeout := s.config().ClientTimeout
	if s.full() {
		timeout = min(timeout, fullFirstByte) // only an RPC request may come in
	}
	c.SetDeadline(time.Now().Add(timeout))
	// One buffered reader for the connection's life: the handshake and
	// pipelined headers then cost one read(2) per burst, not per field.
	sk := newSock(c, &s.pipes)
	br := bufio.NewReaderSize(sk, 1024)
	first, err := br.Peek(1)
	if err != nil {
		return
	}
	remote := addrPort(c.RemoteAddr())
	switch first[0] {
	case 0x73, 0x43:
		if !s.takeDataConn() {
			s.log.Warn("rejecting connection: maxClients reached", "remote", remote)
			return
		}
		defer s.dataConns.Add(-1)
		c.SetDeadline(time.Now().Add(s.config().ClientTimeout))
	}
	switch first[0] {
	case 0x73:
		cc := &clientConn{srv: s, c: c, s: sk, r: br, addr: remote, self: addrPort(c.LocalAddr()), log: s.log}
		cc.serveDNBD3()
	case 'G', 'P':
		c.SetDeadline(time.Time{})
		prefix, _ := br.Peek(br.Buffered())
		handedOff = s.rpc.handoff(c, prefix, func() { s.untrack(c) })
	case 0x43:
		if !s.config().ISCSIServer {
			s.log.Info("closing iSCSI login attempt: iScsiServer=false", "remote", remote)
			return
		}
		s.iscsi.Serve(context.Background(), &sockConn{Conn: c, sk: sk}, br)
	default:
		s.log.Debug("closing: unknown protocol", "remote", remote, "firstByte", first[0])
	}
}

func (s *Server) addClient(cc *clientConn) {
	s.connMu.Lock()
	s.clients[cc] = struct{}{}
	s.connMu.Unlock()
}

func (s *Server) removeClient(cc *clientConn) {
	s.connMu.Lock()
	delete(s.clients, cc)
	s.met.foldLocked(cc)
	s.connMu.Unlock()
}

// clientList returns the connected (handshaken) clients.
func (s *Server) clientList() []*clientConn {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	return slices.Collect(maps.Keys(s.clients))
}

// Reload re-reads server.conf (keys that are not startup-only) and rescans
// the base path (SIGHUP). alt-servers and rpc.acl are read only at start,
// as in the reference.
func (s *Server) Reload() error {
	if s.opts.ConfigDir == "" {
		return s.rescan()
	}
	cfg, warnings, err := LoadConfig(s.opts.ConfigDir, s.config())
	for _, w := range warnings {
		s.log.Warn("server.conf: " + w)
	}
	if err != nil {
		s.log.Error("reload: keeping the old configuration", "err", err)
	} else {
		s.cfg.Store(&cfg)
	}
	return s.rescan()
}

// rescan reloads the images below basePath.
func (s *Server) rescan() error {
	added, replaced, removed, err := s.store.reload()
	if err != nil {
		return err
	}
	s.log.Info("reloaded", "added", added, "replaced", replaced, "removed", removed)
	return nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// errTooManyFiles is retried by the accept loop.
var errTooManyFiles = syscall.EMFILE
