package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowstore/upload"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
)

// fakeEngine is a minimal in-memory merge engine. Updates to cluster
// blockCluster wait until release is closed.
type fakeEngine struct {
	mu           sync.Mutex
	cfg          merger.Config
	sessions     map[string]*merger.SessionInfo
	updates      int
	closed       bool
	closedAfter  int // updates completed when Close was called
	blockCluster int
	entered      chan struct{}
	release      chan struct{}
}

func newFakeEngine() *fakeEngine {
	return &fakeEngine{sessions: make(map[string]*merger.SessionInfo), blockCluster: -1,
		entered: make(chan struct{}, 1), release: make(chan struct{})}
}

func (f *fakeEngine) open(_ context.Context, cfg merger.Config) (service, error) {
	f.mu.Lock()
	f.cfg = cfg
	f.mu.Unlock()
	return f, nil
}

func (f *fakeEngine) Create(name string, rev, _ int) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := fmt.Sprintf("%08x-1111-4111-8111-111111111111", len(f.sessions)+1)
	f.sessions[id] = &merger.SessionInfo{UUID: id, ImageName: name, OriginalRevision: rev, NewRevision: -1, State: merger.StateActive}
	return *f.sessions[id], nil
}

func (f *fakeEngine) CanUpload(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.sessions[id]; !ok {
		return merger.ErrSessionNotFound
	}
	return nil
}

func (f *fakeEngine) Update(id string, u merger.Update) error {
	if u.Cluster == f.blockCluster {
		f.entered <- struct{}{}
		<-f.release
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sessions[id]
	if !ok {
		return merger.ErrSessionNotFound
	}
	s.TotalClusters++
	f.updates++
	return nil
}

func (f *fakeEngine) Merge(id string, _, _ int64) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sessions[id]
	if !ok {
		return merger.SessionInfo{}, merger.ErrSessionNotFound
	}
	s.State = merger.StateMerging
	return *s, nil
}

func (f *fakeEngine) Status(id string) (merger.SessionInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sessions[id]
	if !ok {
		return merger.SessionInfo{}, merger.ErrSessionNotFound
	}
	return *s, nil
}

func (f *fakeEngine) TopModified(string, int) ([]merger.ClusterCount, error) { return nil, nil }

func (f *fakeEngine) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed, f.closedAfter = true, f.updates
	return nil
}

// dirs creates the three directories and returns the flags naming them.
func dirs(t *testing.T) (root string, args []string) {
	t.Helper()
	root = t.TempDir()
	for _, d := range []string{"work", "orig", "dest"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root, []string{"--working-dir", filepath.Join(root, "work"), "--original-dir", filepath.Join(root, "orig"),
		"--destination-dir", filepath.Join(root, "dest"), "--settings", ""}
}

// started is a run in the background.
type started struct {
	addrs  []net.Addr
	cancel context.CancelFunc
	code   chan int
	stderr *testutil.Buffer
}

// startRun runs the command with args until the test cancels it; it
// returns once the server listens.
func startRun(t *testing.T, ctx context.Context, args []string, open openFunc) *started {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	s := &started{cancel: cancel, code: make(chan int, 1), stderr: &testutil.Buffer{}}
	ready := make(chan []net.Addr, 1)
	go func() {
		s.code <- run(ctx, args, env{stdout: s.stderr, stderr: s.stderr, open: open, ready: func(a []net.Addr) { ready <- a }})
	}()
	select {
	case s.addrs = <-ready:
	case code := <-s.code:
		cancel()
		t.Fatalf("run ended with %d before listening:\n%s", code, s.stderr)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("server did not start")
	}
	t.Cleanup(cancel)
	return s
}

// wait waits for run to return.
func (s *started) wait(t *testing.T) int {
	t.Helper()
	select {
	case c := <-s.code:
		return c
	case <-time.After(15 * time.Second):
		t.Fatalf("run did not stop:\n%s", s.stderr)
		return -1
	}
}

func TestRunServesAndStopsCleanly(t *testing.T) {
	root, args := dirs(t)
	tokenFile := filepath.Join(root, "token")
	if err := os.WriteFile(tokenFile, []byte("t0k3n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	eng := newFakeEngine()
	eng.blockCluster = 9
	args = append(args, "--listen", "http://127.0.0.1:0", "--token-file", tokenFile, "--log-level", "debug",
		"--retention", "2d", "--abandon-after", "90m", "--max-merges", "3", "--min-free-space", "2G",
		"--max-sessions", "7", "--max-sessions-per-image", "3", "--max-open-sessions", "9", "--session-quota", "3G",
		"--abandon-empty-after", "20m")
	s := startRun(t, context.Background(), args, eng.open)

	// The engine got the configuration.
	eng.mu.Lock()
	cfg := eng.cfg
	eng.mu.Unlock()
	want := merger.Config{WorkingDirectory: filepath.Join(root, "work"), OriginalImageDirectory: filepath.Join(root, "orig"),
		DestinationDirectory: filepath.Join(root, "dest"), Retention: 48 * time.Hour, AbandonAfter: 90 * time.Minute,
		MaxConcurrentMerges: 3, MinFreeSpace: 2 << 30, MaxSessions: 7, MaxSessionsPerImage: 3, MaxOpenSessions: 9,
		SessionQuota: 3 << 30, AbandonEmptyAfter: 20 * time.Minute}
	if cfg.Logger == nil {
		t.Error("no logger given to the engine")
	}
	cfg.Logger = nil
	if cfg != want {
		t.Errorf("engine config = %+v, want %+v", cfg, want)
	}

	addr := s.addrs[0].String()
	if len(s.addrs) != 1 || !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Fatalf("listening on %v", s.addrs)
	}
	if !strings.Contains(s.stderr.String(), "listening") || !strings.Contains(s.stderr.String(), addr) {
		t.Errorf("listen address not logged:\n%s", s.stderr)
	}
	ctx := context.Background()
	m, err := upload.NewMergerClient(addr, upload.MergerConfig{Token: "t0k3n"})
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseIdleConnections()
	id, err := m.Create(ctx, "img", 1)
	if err != nil {
		t.Fatal(err)
	}
	var bf [40]byte
	bf[0] = 1
	block := make([]byte, 4096)
	if err := m.Update(ctx, id, 1, bf, block); err != nil {
		t.Fatal(err)
	}
	// Without the token: 401.
	anon, _ := upload.NewMergerClient(addr, upload.MergerConfig{})
	if _, err := anon.Status(ctx, id); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("status without token: %v", err)
	}
	anon.CloseIdleConnections()

	// An update in flight when the shutdown begins still completes.
	done := make(chan error, 1)
	go func() { done <- m.Update(ctx, id, 9, bf, block) }()
	<-eng.entered
	s.cancel()
	time.Sleep(100 * time.Millisecond) // let Shutdown close the listener
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("still accepting connections during the shutdown")
	}
	eng.mu.Lock()
	closedEarly := eng.closed
	eng.mu.Unlock()
	if closedEarly {
		t.Fatal("engine closed while a request was in flight")
	}
	close(eng.release)
	if err := <-done; err != nil {
		t.Fatalf("in-flight update: %v", err)
	}
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit code %d:\n%s", code, s.stderr)
	}
	if !eng.closed || eng.closedAfter != 2 {
		t.Errorf("engine closed=%v after %d updates, want closed after 2", eng.closed, eng.closedAfter)
	}
	if strings.Contains(s.stderr.String(), "readable by every user") {
		t.Error("warned about a 0600 token file")
	}
}

func TestRunTokenFileWarning(t *testing.T) {
	root, args := dirs(t)
	tokenFile := filepath.Join(root, "token")
	if err := os.WriteFile(tokenFile, []byte("tok"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(tokenFile, 0o644) // whatever the umask
	s := startRun(t, context.Background(), append(args, "--listen", "127.0.0.1:0", "--token-file", tokenFile), newFakeEngine().open)
	s.cancel()
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if !strings.Contains(s.stderr.String(), "readable by every user") || !strings.Contains(s.stderr.String(), tokenFile) {
		t.Errorf("no warning about the world-readable token file:\n%s", s.stderr)
	}
}

func TestRunNoTokenWarning(t *testing.T) {
	_, args := dirs(t)
	s := startRun(t, context.Background(), append(args, "--listen", "http://0.0.0.0:0"), newFakeEngine().open)
	s.cancel()
	s.wait(t)
	if !strings.Contains(s.stderr.String(), "no --token-file") {
		t.Errorf("no warning about an open non-loopback listener:\n%s", s.stderr)
	}
}

// TestRunTokenOverPlainHTTPWarning checks the warning at start when a
// token would cross the network in clear text. The non-loopback address
// is from TEST-NET-1 (192.0.2.0/24), which no interface has: nothing is
// bound, the listen fails after the warning (exit 1).
func TestRunTokenOverPlainHTTPWarning(t *testing.T) {
	root, args := dirs(t)
	tokenFile := filepath.Join(root, "token")
	if err := os.WriteFile(tokenFile, []byte("tok"), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, key, _ := selfSigned(t, root)
	args = append(args, "--token-file", tokenFile, "--tls-cert", cert, "--tls-key", key)
	const warning = "clear text"
	for _, c := range []struct {
		listen string
		warn   bool
	}{
		{"http://192.0.2.1:5000", true},
		{"https://127.0.0.1:0;http://[2001:db8::1]:5000", true},
		{"https://192.0.2.1:5443", false},
		{"http://127.0.0.1:0;http://localhost:0", false},
	} {
		var out testutil.Buffer
		ctx, cancel := context.WithCancel(context.Background())
		ready := func([]net.Addr) { cancel() } // stop at once if it starts
		code := run(ctx, append(args, "--listen", c.listen), env{stdout: &out, stderr: &out, open: newFakeEngine().open, ready: ready})
		cancel()
		if got := strings.Contains(out.String(), warning); got != c.warn {
			t.Errorf("--listen %s (exit %d): clear-text warning %v, want %v:\n%s", c.listen, code, got, c.warn, out.String())
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	root, args := dirs(t)
	bad := filepath.Join(root, "bad.json")
	os.WriteFile(bad, []byte(`{"Settings":{"WorkingDirectory":"/no/such/dir"}}`), 0o644)
	https := filepath.Join(root, "https.json")
	os.WriteFile(https, []byte(`{"Urls":"https://127.0.0.1:0"}`), 0o644)
	empty := filepath.Join(root, "empty")
	os.WriteFile(empty, nil, 0o600)
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--no-such-flag"}, 2, "unknown flag"},
		{[]string{"--max-merges", "x"}, 2, "max-merges"},
		{[]string{"extra"}, 2, "unexpected argument"},
		{[]string{"--settings", bad, "--original-dir", filepath.Join(root, "orig"), "--destination-dir", filepath.Join(root, "dest")}, 1, "Settings.WorkingDirectory"},
		{append(args[:len(args)-2:len(args)-2], "--settings", https), 1, "--tls-cert"},
		{append(args, "--listen", "https://127.0.0.1:0"), 2, "--tls-cert"},
		{append(args, "--listen", "127.0.0.1:0", "--tls-cert", empty, "--tls-key", empty), 1, "TLS certificate"},
		{append(args, "--listen", "127.0.0.1:0", "--token-file", filepath.Join(root, "none")), 1, "token file"},
		{append(args, "--listen", "127.0.0.1:0", "--token-file", empty), 1, "is empty"},
		{[]string{"--working-dir", filepath.Join(root, "work"), "--original-dir", filepath.Join(root, "orig"), "--destination-dir", filepath.Join(root, "nope")}, 1, "Settings.DestinationDirectory"},
		{[]string{"--help"}, 0, "--working-dir"},
	} {
		var out testutil.Buffer
		// None of these may start serving; the timeout stops one that does.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		code := run(ctx, c.args, env{stdout: &out, stderr: &out, cwd: root, open: newFakeEngine().open})
		cancel()
		if code != c.code || !strings.Contains(out.String(), c.msg) {
			t.Errorf("%v: exit %d, want %d with %q:\n%s", c.args, code, c.code, c.msg, out.String())
		}
	}
	var out testutil.Buffer
	if code := run(context.Background(), []string{"--version"}, env{stdout: &out, stderr: &out}); code != 0 || !strings.Contains(out.String(), "dnbd3go") {
		t.Errorf("--version: %d %q", code, out.String())
	}
	// The engine failing to start is exit 1.
	failing := func(context.Context, merger.Config) (service, error) { return nil, errors.New("journal corrupt") }
	out = testutil.Buffer{}
	if code := run(context.Background(), append(args, "--listen", "127.0.0.1:0"), env{stdout: &out, stderr: &out, open: failing}); code != 1 || !strings.Contains(out.String(), "journal corrupt") {
		t.Errorf("engine failure: %d\n%s", code, out.String())
	}
	// A port in use is exit 1.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	out = testutil.Buffer{}
	if code := run(context.Background(), append(args, "--listen", "http://"+ln.Addr().String()), env{stdout: &out, stderr: &out, open: newFakeEngine().open}); code != 1 {
		t.Errorf("port in use: %d\n%s", code, out.String())
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dnbd3-merger test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestRunHTTPSAndHTTP(t *testing.T) {
	root, args := dirs(t)
	cert, key, pool := selfSigned(t, root)
	settings := filepath.Join(root, "appsettings.json")
	os.WriteFile(settings, []byte(`{"Urls": "https://127.0.0.1:0;http://127.0.0.1:0"}`), 0o644)
	args = append(args[:len(args)-2:len(args)-2], "--settings", settings, "--tls-cert", cert, "--tls-key", key)
	s := startRun(t, context.Background(), args, newFakeEngine().open)
	if len(s.addrs) != 2 {
		t.Fatalf("addrs %v", s.addrs)
	}
	ctx := context.Background()
	m, err := upload.NewMergerClient("https://"+s.addrs[0].String(), upload.MergerConfig{TLSConfig: &tls.Config{RootCAs: pool}})
	if err != nil {
		t.Fatal(err)
	}
	id, err := m.Create(ctx, "img", 1)
	if err != nil {
		t.Fatal(err)
	}
	m.CloseIdleConnections()
	// The plain listener serves the same engine.
	resp, err := http.Get("http://" + s.addrs[1].String() + "/v1/file/status?uuid=" + id)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("plain status: %d", resp.StatusCode)
	}
	// Plain HTTP on the TLS port fails.
	if resp, err := http.Get("http://" + s.addrs[0].String() + "/v1/file/status?uuid=" + id); err == nil && resp.StatusCode == 200 {
		t.Fatal("TLS listener answered plain HTTP")
	}
	s.cancel()
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

func TestSignalStopsRun(t *testing.T) {
	_, args := dirs(t)
	ctx, stop := signalContext()
	defer stop()
	eng := newFakeEngine()
	s := startRun(t, ctx, append(args, "--listen", "127.0.0.1:0"), eng.open)
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := s.wait(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, s.stderr)
	}
	if !eng.closed {
		t.Error("engine not closed after SIGTERM")
	}
	if !strings.Contains(s.stderr.String(), "shutting down") {
		t.Errorf("no shutdown log:\n%s", s.stderr)
	}
}
