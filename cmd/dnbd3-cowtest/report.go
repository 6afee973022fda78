package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// reporter prints one line per step (name, offset range, OK / FAILED /
// SKIP, time) and the summary, and counts the results.
type reporter struct {
	w      io.Writer
	start  time.Time
	ok     int
	failed int
	skip   int
	notRun int
}

func newReporter(w io.Writer) *reporter {
	return &reporter{w: w, start: time.Now()}
}

// span is a half-open byte range [from, to) for a step's line; a step
// without a range uses noSpan.
type span struct{ from, to int64 }

var noSpan = span{-1, -1}

// label is a free-form second column of a step line.
type label string

func (l label) String() string { return string(l) }

func (s span) String() string {
	if s == noSpan {
		return "-"
	}
	return fmt.Sprintf("[%d, %d)", s.from, s.to)
}

// step runs fn as one step and prints its line. An error that wraps a
// *resizeUnavailableError is a skip (printed as "SKIP: name: cannot resize
// DEVICE: reason"); any other error is a failure. step reports whether the
// run may go on (OK or skipped).
func (r *reporter) step(name string, sp fmt.Stringer, fn func() error) bool {
	t0 := time.Now()
	err := fn()
	d := time.Since(t0)
	var unavailable *resizeUnavailableError
	switch {
	case err == nil:
		r.ok++
		r.line(name, sp, "OK", d)
	case errors.As(err, &unavailable):
		r.skip++
		r.line(name, sp, "SKIP", d)
		fmt.Fprintf(r.w, "SKIP: %s: %v\n", name, unavailable)
	default:
		r.failed++
		r.line(name, sp, "FAILED", d)
		fmt.Fprintf(r.w, "    %s: %v\n", name, err)
	}
	return err == nil || unavailable != nil
}

// skipped records a step that is skipped because resizing is unavailable.
func (r *reporter) skipped(name string, sp fmt.Stringer, why error) {
	r.step(name, sp, func() error { return why })
}

func (r *reporter) line(name string, sp fmt.Stringer, result string, d time.Duration) {
	fmt.Fprintf(r.w, "%-34s %-30s %-6s %s\n", name, sp, result, roundDuration(d))
}

// roundDuration keeps three significant digits or so.
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond)
	case d >= 10*time.Millisecond:
		return d.Round(time.Millisecond)
	default:
		return d.Round(time.Microsecond)
	}
}

// finish prints the summary and returns the exit code: exitOK unless a step
// failed. Skipped steps are counted and shown, but are not failures.
func (r *reporter) finish(title string) int {
	verdict := "PASSED"
	if r.failed > 0 {
		verdict = "FAILED"
	}
	fmt.Fprintf(r.w, "%s: %s: %d OK, %d FAILED, %d SKIPPED", title, verdict, r.ok, r.failed, r.skip)
	if r.notRun > 0 {
		fmt.Fprintf(r.w, ", %d not run", r.notRun)
	}
	fmt.Fprintf(r.w, " (%s)\n", roundDuration(time.Since(r.start)))
	if r.failed > 0 {
		return exitFailure
	}
	return exitOK
}

// mismatchError is a byte that differs from what a step expects.
type mismatchError struct {
	what      string // the check, e.g. "read-back"
	off       int64  // absolute offset
	want, got byte
}

func (e *mismatchError) Error() string {
	return fmt.Sprintf("%s: offset %d: expected 0x%02x, got 0x%02x", e.what, e.off, e.want, e.got)
}

// compareBuf returns a *mismatchError for the first byte where got differs
// from want (got was read at off), or nil.
func compareBuf(what string, off int64, got, want []byte) error {
	if i := firstDiff(got, want); i >= 0 {
		return &mismatchError{what: what, off: off + int64(i), want: want[i], got: got[i]}
	}
	return nil
}

// firstDiff returns the index of the first byte where a and b (of equal
// length) differ, or -1 if they are equal.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// fill sets every byte of b to v.
func fill(b []byte, v byte) {
	if len(b) == 0 {
		return
	}
	b[0] = v
	for n := 1; n < len(b); n *= 2 {
		copy(b[n:], b[:n])
	}
}

// filled returns n bytes of v.
func filled(n int64, v byte) []byte {
	b := make([]byte, n)
	fill(b, v)
	return b
}

// interrupted is returned by long loops when the context ends.
func interrupted(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted: %w", err)
	}
	return nil
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return interrupted(ctx)
	}
}
