package netns

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serverConf is what a test chooses about a server's server.conf and
// alt-servers file.
type serverConf struct {
	// Proxy sets isProxy=true.
	Proxy bool
	// BGR is backgroundReplication ("true", "false", "hashblock"); empty
	// writes "false" for proxies (tests opt in to replication).
	BGR string
	// BGRWindow is bgrWindowSize (0: not written).
	BGRWindow int
	// Uplinks are written to alt-servers as for=replication entries (used
	// as uplinks, never announced to clients), "ip:port".
	Uplinks []string
	// Extra is appended to the [dnbd3] section verbatim.
	Extra string
}

// server is a dnbd3-server process in a namespace.
type server struct {
	t    *testing.T
	name string // for messages: "origin", "proxy B", ...
	ns   string
	ip   string // the address clients in other namespaces use
	dir  string // configuration directory
	base string // basePath
	logf string // console output of every start, appended

	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// addr is ip:port.
func (s *server) addr() string { return net.JoinHostPort(s.ip, strconv.Itoa(dnbd3Port)) }

// newServer prepares the directories and config of a server in ns and
// starts it. ip is the address other hosts reach it at.
func newServer(t *testing.T, name, ns, ip string, conf serverConf) *server {
	t.Helper()
	root := filepath.Join(t.TempDir(), strings.ReplaceAll(name, " ", "-"))
	s := &server{t: t, name: name, ns: ns, ip: ip,
		dir: filepath.Join(root, "etc"), base: filepath.Join(root, "images"), logf: filepath.Join(root, "server.log")}
	for _, d := range []string{s.dir, s.base} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "[dnbd3]\nbasePath=%s\nlistenPort=%d\n", s.base, dnbd3Port)
	if conf.Proxy {
		bgr := conf.BGR
		if bgr == "" {
			bgr = "false"
		}
		fmt.Fprintf(&b, "isProxy=true\nbackgroundReplication=%s\n", bgr)
		if conf.BGRWindow > 0 {
			fmt.Fprintf(&b, "bgrWindowSize=%d\n", conf.BGRWindow)
		}
		// Replicated copies are preallocated by default; the tests'
		// images are small.
		b.WriteString("autoFreeDiskSpaceDelay=-1\n")
	}
	b.WriteString(conf.Extra)
	b.WriteString("\n[logging]\nconsoleMask=ERROR WARNING MINOR INFO DEBUG1\nconsoleTimestamps=true\n")
	writeFile(t, filepath.Join(s.dir, "server.conf"), b.String())
	if len(conf.Uplinks) > 0 {
		var a strings.Builder
		for _, u := range conf.Uplinks {
			fmt.Fprintf(&a, "[%s]\ncomment=uplink of %s\nfor=replication\n\n", u, name)
		}
		writeFile(t, filepath.Join(s.dir, "alt-servers"), a.String())
	}
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			s.dumpLog()
		}
	})
	return s
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// start runs the server and waits until it accepts connections.
func (s *server) start() {
	s.t.Helper()
	if s.running() {
		s.t.Fatalf("%s is already running", s.name)
	}
	lf, err := os.OpenFile(s.logf, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	fmt.Fprintf(lf, "===== %s: start %s in %s\n", time.Now().Format("15:04:05.000"), s.name, s.ns)
	cmd := exec.Command("ip", "netns", "exec", s.ns, filepath.Join(binDir, "dnbd3-server"), "-n", "-c", s.dir)
	cmd.Stdout, cmd.Stderr = lf, lf
	// If the test binary dies (timeout), its servers die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		s.t.Fatalf("start %s: %v", s.name, err)
	}
	s.cmd, s.done = cmd, make(chan struct{})
	done := s.done
	go func() { cmd.Wait(); lf.Close(); close(done) }()
	if err := waitListening(s.ns, s.addr(), 10*time.Second); err != nil {
		s.kill()
		s.t.Fatalf("%s (dnbd3-server in %s) does not accept connections on %s: %v\n%s", s.name, s.ns, s.addr(), err, s.logTail(40))
	}
}

func (s *server) running() bool {
	if s.done == nil {
		return false
	}
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// signal sends sig to the server process.
func (s *server) signal(sig syscall.Signal) {
	s.t.Helper()
	if !s.running() {
		s.t.Fatalf("%s is not running (cannot send %v)\n%s", s.name, sig, s.logTail(40))
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("signal %v to %s: %v", sig, s.name, err)
	}
}

// stop sends SIGTERM and waits for a clean exit (SIGKILL after 15 s, which
// fails the test).
func (s *server) stop() {
	s.t.Helper()
	s.signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.kill()
		s.t.Fatalf("%s did not exit within 15 s of SIGTERM\n%s", s.name, s.logTail(40))
	}
	if code := s.cmd.ProcessState.ExitCode(); code != 0 {
		s.t.Errorf("%s exited with status %d after SIGTERM\n%s", s.name, code, s.logTail(40))
	}
}

// kill sends SIGKILL (if running) and waits for the process.
func (s *server) kill() {
	if !s.running() {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
}

func (s *server) readLog() string {
	b, _ := os.ReadFile(s.logf)
	return string(b)
}

// logTail returns the last n lines of the server's console output.
func (s *server) logTail(n int) string {
	lines := strings.Split(strings.TrimRight(s.readLog(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "--- " + s.name + " log (last lines) ---\n" + strings.Join(lines, "\n")
}

func (s *server) dumpLog() { s.t.Log("\n" + s.logTail(150)) }

// imagePath is the path of an image file below basePath.
func (s *server) imagePath(name string, rid int) string {
	return filepath.Join(s.base, fmt.Sprintf("%s.r%d", name, rid))
}

// --- RPC -------------------------------------------------------------------

// rpcStats is the part of GET /query the tests look at.
type rpcStats struct {
	BytesReceived uint64      `json:"bytesReceived"`
	BytesSent     uint64      `json:"bytesSent"`
	ClientCount   int         `json:"clientCount"`
	ServerCount   int         `json:"serverCount"`
	Images        []rpcImage  `json:"images"`
	Clients       []rpcClient `json:"clients"`
}

type rpcImage struct {
	ID            int    `json:"id"`
	Name          string `json:"name"`
	RID           int    `json:"rid"`
	Users         int    `json:"users"`
	Complete      int    `json:"complete"`
	Size          int64  `json:"size"`
	Problems      int    `json:"problems"`
	BytesReceived uint64 `json:"bytesReceived"`
	UplinkServer  string `json:"uplinkServer"`
}

type rpcClient struct {
	Address  string `json:"address"`
	ImageID  int    `json:"imageId"`
	IsServer int    `json:"isServer"`
}

// image returns the entry of the named image, or nil.
func (r *rpcStats) image(name string) *rpcImage {
	for i := range r.Images {
		if r.Images[i].Name == name {
			return &r.Images[i]
		}
	}
	return nil
}

// httpGet fetches path from the server's RPC, from inside its namespace.
func (s *server) httpGet(path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dialIn(ctx, s.ns, addr)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+s.addr()+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body))
	}
	return body, nil
}

// tryQuery asks GET /query?q=stats&q=images&q=clients.
func (s *server) tryQuery() (*rpcStats, error) {
	body, err := s.httpGet("/query?q=stats&q=images&q=clients")
	if err != nil {
		return nil, err
	}
	var r rpcStats
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("RPC answer is not JSON: %v: %.300s", err, body)
	}
	return &r, nil
}

// query is tryQuery that fails the test on error.
func (s *server) query() *rpcStats {
	s.t.Helper()
	r, err := s.tryQuery()
	if err != nil {
		s.t.Fatalf("RPC of %s: %v\n%s", s.name, err, s.logTail(30))
	}
	return r
}

// cacheMap fetches /cachemap for the image and returns the number of 4 KiB
// blocks present, or all when the server says the image is complete.
func (s *server) cacheMap(id int, size int64) (int64, error) {
	body, err := s.httpGet(fmt.Sprintf("/cachemap?id=%d", id))
	if err != nil {
		return 0, err
	}
	blocks := (size + 4095) / 4096
	if len(body) == 1 && body[0] == 0xFF && blocks > 8 {
		return blocks, nil // complete
	}
	return countBits(body, blocks), nil
}

// countBits counts the set bits of a cache map (bit k = block k, LSB
// first) among the first n blocks.
func countBits(m []byte, n int64) int64 {
	var c int64
	for k := int64(0); k < n && k/8 < int64(len(m)); k++ {
		if m[k/8]&(1<<(k%8)) != 0 {
			c++
		}
	}
	return c
}

// waitFor polls cond every 100 ms until it is true or within has passed;
// then the test fails with what() describing the last state.
func waitFor(t *testing.T, within time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last state: %s)", within, what, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
