package e2e

// Helpers of the browser tests: a headless chromium driven by chromedp,
// the console messages it collects, screenshots under out/screenshots.

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// browserBudget bounds each browser test (the make test budget is tight).
const browserBudget = 60 * time.Second

// browser is a headless chromium with one tab.
type browser struct {
	ctx  context.Context
	mu   sync.Mutex
	msgs []chromedp.ConsoleMessage
}

// findChromium returns the path of a chromium binary, "" if none.
func findChromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// newBrowser starts chromium, or skips the test visibly without it.
func newBrowser(t *testing.T) *browser {
	t.Helper()
	path := findChromium()
	if path == "" {
		fmt.Fprintf(os.Stderr, "SKIP %s: chromium not installed (apt-get install chromium, or make deps)\n", t.Name())
		t.Skip("chromium not installed (apt-get install chromium, or make deps)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox,
		chromedp.DisableGPU, chromedp.WindowSize(1400, 1000), chromedp.UserDataDir(t.TempDir()))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx)
	ctx, cancelTime := context.WithTimeout(ctx, browserBudget)
	t.Cleanup(func() { cancelTime(); cancelCtx(); cancelAlloc() })
	b := &browser{ctx: ctx}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	msgs := chromedp.Console(ctx)
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.msgs = append(b.msgs, m)
			b.mu.Unlock()
		}
	}()
	return b
}

// do runs actions, failing the test with what on error.
func (b *browser) do(t *testing.T, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(b.ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// eval evaluates a JavaScript expression returning a string.
func (b *browser) eval(t *testing.T, expr string) string {
	t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// text returns the rendered text of the first node matching the CSS
// selector sel ("" if none).
func (b *browser) text(t *testing.T, sel string) string {
	t.Helper()
	return b.eval(t, fmt.Sprintf(`(document.querySelector(%q) || {innerText: ""}).innerText`, sel))
}

// waitJS waits until the JavaScript expression is truthy.
func (b *browser) waitJS(t *testing.T, what, expr string, within time.Duration) {
	t.Helper()
	if _, err := chromedp.Run(b.ctx, chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(within),
		chromedp.WithPollingInterval(100*time.Millisecond))); err != nil {
		t.Fatalf("waiting for %s (%s): %v", what, expr, err)
	}
}

// screenshot saves a full-page PNG as out/screenshots/name.png (repository
// root) and returns its path.
func (b *browser) screenshot(t *testing.T, name string) string {
	t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	dir := filepath.Join("..", "..", "out", "screenshots")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot %s (%d bytes)", path, len(png))
	return path
}

// checkConsole fails the test for every console error and uncaught
// exception of the page.
func (b *browser) checkConsole(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.msgs {
		if m.Type == chromedp.ConsoleError || m.IsException() {
			t.Errorf("browser console: %s (%s:%d)", m, m.URL, m.Line)
		}
	}
}

// throttle is a TCP relay to target that passes at most rate bytes per
// second towards the client: a slow uplink for a proxy under test.
type throttle struct {
	ln     net.Listener
	target string
	rate   int64
}

func startThrottle(t *testing.T, target string, rate int64) *throttle {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	th := &throttle{ln: ln, target: target, rate: rate}
	go th.accept()
	t.Cleanup(func() { ln.Close() })
	return th
}

func (th *throttle) addr() string { return th.ln.Addr().String() }

func (th *throttle) accept() {
	for {
		c, err := th.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", th.target)
		if err != nil {
			c.Close()
			continue
		}
		go func() { io.Copy(u, c); u.Close() }()
		go func() { th.slowCopy(c, u); c.Close() }()
	}
}

// slowCopy copies src to dst at th.rate bytes per second.
func (th *throttle) slowCopy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 16<<10)
	start := time.Now()
	var sent int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
			sent += int64(n)
			if due := start.Add(time.Duration(sent * int64(time.Second) / th.rate)); time.Until(due) > 0 {
				time.Sleep(time.Until(due))
			}
		}
		if err != nil {
			return
		}
	}
}

// startServerConf runs dnbd3-server with server.conf conf (listenPort is
// added) and the other config files given.
func startServerConf(t *testing.T, conf string, files map[string]string) *daemon {
	t.Helper()
	port := freePort(t)
	conf = strings.Replace(conf, "[dnbd3]\n", fmt.Sprintf("[dnbd3]\nlistenPort=%d\n", port), 1)
	return runServerBinary(t, confDir(t, conf, files), port)
}
