// Package progress draws a one-line progress bar for long transfers:
// bytes done, percent, MB/s and ETA, redrawn at most 10 times a second. On
// anything that is not a terminal it draws nothing and can print a final
// summary line instead.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// redrawInterval is the minimum time between two redraws.
const redrawInterval = 100 * time.Millisecond

// Options adjust a Bar. The zero value detects everything from the writer.
type Options struct {
	// Terminal forces terminal mode (true) instead of detecting it.
	Terminal bool
	// Width is the terminal width in columns (default: detected, else 80).
	Width int
	// Summary prints a one-line summary at Finish when not drawing.
	Summary bool
	// Now replaces time.Now (tests).
	Now func() time.Time
}

// Bar is a progress bar. Add may be called from many goroutines.
type Bar struct {
	w     io.Writer
	total int64
	label string
	term  bool
	width int
	sum   bool
	now   func() time.Time
	start time.Time

	done atomic.Int64

	mu       sync.Mutex
	lastDraw time.Time
	finished bool
}

// New returns a bar for a transfer of total bytes (total <= 0: unknown)
// that draws on w if w is a terminal.
func New(w io.Writer, total int64, label string) *Bar {
	return NewWithOptions(w, total, label, Options{})
}

// NewWithOptions is New with explicit options.
func NewWithOptions(w io.Writer, total int64, label string, o Options) *Bar {
	b := &Bar{w: w, total: total, label: label, term: o.Terminal, width: o.Width, sum: o.Summary, now: o.Now}
	if b.now == nil {
		b.now = time.Now
	}
	if !b.term {
		b.term, b.width = detect(w)
		if o.Width > 0 {
			b.width = o.Width
		}
	}
	if b.width <= 0 {
		b.width = 80
	}
	b.start = b.now()
	return b
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	t, _ := detect(w)
	return t
}

// detect reports whether w is a terminal, and its width.
func detect(w io.Writer) (bool, int) {
	f, ok := w.(*os.File)
	if !ok {
		return false, 0
	}
	fd := int(f.Fd())
	if _, err := unix.IoctlGetTermios(fd, unix.TCGETS); err != nil {
		return false, 0
	}
	ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
	if err != nil {
		return true, 0
	}
	return true, int(ws.Col)
}

// Add records n more bytes and redraws if the last redraw is old enough.
func (b *Bar) Add(n int64) {
	b.done.Add(n)
	if !b.term {
		return
	}
	now := b.now()
	if !b.mu.TryLock() {
		return // someone else is drawing
	}
	defer b.mu.Unlock()
	if b.finished || now.Sub(b.lastDraw) < redrawInterval {
		return
	}
	b.lastDraw = now
	b.draw(now)
}

// Finish draws the final state and ends the line (terminal), or prints
// the summary line if Options.Summary was set. Later calls do nothing.
func (b *Bar) Finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished {
		return
	}
	b.finished = true
	now := b.now()
	switch {
	case b.term:
		b.draw(now)
		io.WriteString(b.w, "\n")
	case b.sum:
		fmt.Fprintln(b.w, b.Summary(now))
	}
}

// Summary returns "label: 12.0 MiB in 1.2s (10.5 MB/s)".
func (b *Bar) Summary(now time.Time) string {
	done := b.done.Load()
	el := now.Sub(b.start)
	return fmt.Sprintf("%s: %s in %s (%s)", b.label, Bytes(done), el.Round(time.Millisecond), Rate(done, el))
}

// draw writes the bar line; b.mu is held.
func (b *Bar) draw(now time.Time) {
	io.WriteString(b.w, "\r"+b.Line(now)+"\x1b[K")
}

// Line renders the bar for the current count without control characters.
func (b *Bar) Line(now time.Time) string {
	done := b.done.Load()
	el := now.Sub(b.start)
	var right string
	if b.total > 0 {
		pct := float64(done) * 100 / float64(b.total)
		eta := "--:--"
		if done > 0 && done < b.total && el > 0 {
			left := time.Duration(float64(el) * float64(b.total-done) / float64(done))
			eta = clock(left)
		} else if done >= b.total {
			eta = clock(0)
		}
		right = fmt.Sprintf(" %s / %s %5.1f%% %s ETA %s", Bytes(done), Bytes(b.total), pct, Rate(done, el), eta)
	} else {
		right = fmt.Sprintf(" %s %s %s", Bytes(done), Rate(done, el), clock(el))
	}
	left := b.label
	barWidth := b.width - len(left) - len(right) - 4
	if b.total <= 0 || barWidth < 10 {
		line := left + right
		if len(line) > b.width-1 {
			line = line[:b.width-1]
		}
		return line
	}
	fill := int(float64(barWidth) * float64(min(done, b.total)) / float64(b.total))
	return left + " [" + strings.Repeat("=", fill) + strings.Repeat(" ", barWidth-fill) + "]" + right
}

// Bytes formats a byte count with binary units ("1.5 MiB").
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		v /= unit
		if v < unit || u == "TiB" {
			return fmt.Sprintf("%.1f %s", v, u)
		}
	}
	return ""
}

// Rate formats a transfer rate in decimal megabytes per second.
func Rate(n int64, d time.Duration) string {
	if d <= 0 {
		return "-- MB/s"
	}
	return fmt.Sprintf("%.1f MB/s", float64(n)/d.Seconds()/1e6)
}

// clock formats a duration as m:ss or h:mm:ss.
func clock(d time.Duration) string {
	s := int64(d.Round(time.Second) / time.Second)
	if s >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}
