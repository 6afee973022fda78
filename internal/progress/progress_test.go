package progress

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestTerminalRendering(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	var buf bytes.Buffer
	b := NewWithOptions(&buf, 100<<20, "get img", Options{Terminal: true, Width: 100, Now: clk.now})
	clk.advance(time.Second)
	b.Add(25 << 20)
	out := buf.String()
	if !strings.HasPrefix(out, "\r") || !strings.HasSuffix(out, "\x1b[K") {
		t.Fatalf("no redraw control sequence: %q", out)
	}
	line := b.Line(clk.now())
	for _, want := range []string{"get img [", "25.0 MiB / 100.0 MiB", " 25.0%", "26.2 MB/s", "ETA 0:03"} {
		if !strings.Contains(line, want) {
			t.Errorf("line %q lacks %q", line, want)
		}
	}
	if len(line) > 99 {
		t.Errorf("line of %d columns for width 100: %q", len(line), line)
	}
	if n := strings.Count(line, "="); n < 9 || n > 12 {
		t.Errorf("bar fill %d, want a quarter: %q", n, line)
	}

	// Rate limit: a second Add within 100 ms does not redraw.
	buf.Reset()
	clk.advance(50 * time.Millisecond)
	b.Add(1)
	if buf.Len() != 0 {
		t.Fatalf("redrawn within 100 ms: %q", buf.String())
	}
	clk.advance(60 * time.Millisecond)
	b.Add(1)
	if buf.Len() == 0 {
		t.Fatal("not redrawn after 110 ms")
	}

	buf.Reset()
	b.Add(75<<20 - 2)
	b.Finish()
	out = buf.String()
	if !strings.HasSuffix(out, "\n") || !strings.Contains(out, "100.0%") || !strings.Contains(out, "ETA 0:00") {
		t.Fatalf("final draw: %q", out)
	}
	buf.Reset()
	b.Finish()
	b.Add(5)
	if buf.Len() != 0 {
		t.Fatalf("output after Finish: %q", buf.String())
	}
}

func TestUnknownTotalAndNarrow(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	b := NewWithOptions(&bytes.Buffer{}, 0, "x", Options{Terminal: true, Width: 80, Now: clk.now})
	clk.advance(2 * time.Second)
	b.Add(3 << 20)
	if got := b.Line(clk.now()); got != "x 3.0 MiB 1.6 MB/s 0:02" {
		t.Fatalf("unknown total: %q", got)
	}
	n := NewWithOptions(&bytes.Buffer{}, 1<<30, "a-rather-long-label", Options{Terminal: true, Width: 30, Now: clk.now})
	if got := n.Line(clk.now()); len(got) > 29 || strings.Contains(got, "[") {
		t.Fatalf("narrow terminal: %q", got)
	}
}

func TestNotATerminal(t *testing.T) {
	var buf bytes.Buffer
	b := New(&buf, 1000, "quiet")
	b.Add(500)
	b.Add(500)
	b.Finish()
	if buf.Len() != 0 {
		t.Fatalf("drew on a non-terminal: %q", buf.String())
	}
	clk := &fakeClock{t: time.Unix(0, 0)}
	s := NewWithOptions(&buf, 1000, "sum", Options{Summary: true, Now: clk.now})
	s.Add(3 << 20)
	clk.advance(1500 * time.Millisecond)
	s.Finish()
	if got := buf.String(); got != "sum: 3.0 MiB in 1.5s (2.1 MB/s)\n" {
		t.Fatalf("summary: %q", got)
	}
	f, err := os.CreateTemp(t.TempDir(), "p")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Fatal("a regular file is a terminal")
	}
}

func TestFormatting(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536 << 20: "1.5 GiB", 3 << 40: "3.0 TiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
	if got := clock(3723 * time.Second); got != "1:02:03" {
		t.Errorf("clock = %q", got)
	}
	if got := Rate(5e6, 2*time.Second); got != "2.5 MB/s" {
		t.Errorf("Rate = %q", got)
	}
}

func TestConcurrentAdd(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return buf.Write(p) })
	b := NewWithOptions(w, 8*1000*128, "c", Options{Terminal: true})
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				b.Add(128)
			}
		}()
	}
	wg.Wait()
	b.Finish()
	if !strings.Contains(buf.String(), "100.0%") {
		t.Fatalf("final state: %q", buf.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
