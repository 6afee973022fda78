// Package logging sets up log/slog for the dnbd3go daemons.
//
// It knows the reference server's six log levels (ERROR, WARNING, MINOR,
// INFO, DEBUG1, DEBUG2) and its masks: a mask is a set of levels, not a
// threshold, so "ERROR DEBUG1" logs errors and DEBUG1 lines only. A Logger
// writes to a console writer and to a log file, each with its own mask; the
// file can be reopened (SIGUSR2, for logrotate) and its tail read (RPC
// q=logfile).
//
// Output is produced by the standard slog text or JSON handlers, with the
// level names spelled as above. When the console is a stream systemd
// connected to the journal (JOURNAL_STREAM), console lines start with a
// syslog priority prefix ("<3>" for ERROR ... "<7>" for DEBUG1/2), so that
// `journalctl -p warning` works, and carry no timestamp of their own (the
// journal has one).
package logging

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Levels of the reference server as slog levels. ERROR, WARNING and INFO are
// slog.LevelError, slog.LevelWarn and slog.LevelInfo.
const (
	// LevelMinor is the reference's MINOR level: a warning about something
	// that does not need attention (printed as "Warning" by the reference).
	LevelMinor slog.Level = 2
	// LevelDebug1 is the reference's DEBUG1 level (equal to slog.LevelDebug).
	LevelDebug1 slog.Level = -4
	// LevelDebug2 is the reference's DEBUG2 level: very verbose debugging.
	LevelDebug2 slog.Level = -8
)

// Mask is a set of log levels. Each bit stands for one of the reference's
// levels; a record is written when the bit of its level is set.
type Mask uint8

// The bits of a Mask.
const (
	MaskError Mask = 1 << iota
	MaskWarning
	MaskMinor
	MaskInfo
	MaskDebug1
	MaskDebug2

	// MaskNone logs nothing.
	MaskNone Mask = 0
	// MaskAll logs every level.
	MaskAll = MaskError | MaskWarning | MaskMinor | MaskInfo | MaskDebug1 | MaskDebug2
	// DefaultFileMask is the reference's default fileMask:
	// ERROR WARNING MINOR INFO DEBUG1.
	DefaultFileMask = MaskError | MaskWarning | MaskMinor | MaskInfo | MaskDebug1
	// DefaultConsoleMask is the reference's default consoleMask:
	// ERROR WARNING MINOR INFO.
	DefaultConsoleMask = MaskError | MaskWarning | MaskMinor | MaskInfo
)

// levelWords are the mask words in bit order.
var levelWords = [...]string{"ERROR", "WARNING", "MINOR", "INFO", "DEBUG1", "DEBUG2"}

// ParseMask reads a mask the way the reference does: each level word
// (ERROR, WARNING, MINOR, INFO, DEBUG1, DEBUG2) that occurs anywhere in s as
// a substring adds its level. Words are case-sensitive; anything else in s
// is ignored, so "ERROR WARNING MINOR INFO" and "ERROR,INFO" both work.
func ParseMask(s string) Mask {
	var m Mask
	for i, w := range levelWords {
		if strings.Contains(s, w) {
			m |= 1 << i
		}
	}
	return m
}

// String returns the mask as space-separated level words, the form
// server.conf uses, e.g. "ERROR WARNING MINOR INFO". The empty mask gives "".
func (m Mask) String() string {
	var words []string
	for i, w := range levelWords {
		if m&(1<<i) != 0 {
			words = append(words, w)
		}
	}
	return strings.Join(words, " ")
}

// Has reports whether records of level l pass the mask.
func (m Mask) Has(l slog.Level) bool { return m&levelBit(l) != 0 }

// levelBit maps a slog level to its mask bit. Levels between the named ones
// belong to the next lower named level (slog.LevelWarn+1 is WARNING).
func levelBit(l slog.Level) Mask {
	switch {
	case l >= slog.LevelError:
		return MaskError
	case l >= slog.LevelWarn:
		return MaskWarning
	case l >= LevelMinor:
		return MaskMinor
	case l >= slog.LevelInfo:
		return MaskInfo
	case l >= LevelDebug1:
		return MaskDebug1
	default:
		return MaskDebug2
	}
}

// LevelName returns the reference's word for the level l falls in:
// ERROR, WARNING, MINOR, INFO, DEBUG1 or DEBUG2.
func LevelName(l slog.Level) string {
	b := levelBit(l)
	for i, w := range levelWords {
		if b == 1<<i {
			return w
		}
	}
	return "DEBUG2"
}

// ParseLevel parses a level name for a minimum-level flag: one of error,
// warning (or warn), minor, info, debug1 (or debug), debug2; case-insensitive.
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "error":
		return slog.LevelError, nil
	case "warning", "warn":
		return slog.LevelWarn, nil
	case "minor":
		return LevelMinor, nil
	case "info":
		return slog.LevelInfo, nil
	case "debug1", "debug":
		return LevelDebug1, nil
	case "debug2":
		return LevelDebug2, nil
	}
	return 0, fmt.Errorf("logging: unknown log level %q: use error, warning, minor, info, debug1 or debug2", s)
}

// Options configure New.
type Options struct {
	// Format is the line format: "text" (the default when empty) or "json".
	Format string
	// Console receives console output; nil disables console logging.
	Console io.Writer
	// ConsoleMask selects the levels written to Console; MaskNone (the zero
	// value) writes nothing there. The server uses DefaultConsoleMask.
	ConsoleMask Mask
	// File is the path of the log file; empty disables file logging. The
	// file is opened for appending and created with mode 0640.
	File string
	// FileMask selects the levels written to File; MaskNone writes nothing
	// (the file is still opened). The server uses DefaultFileMask.
	FileMask Mask
	// Timestamps adds the time to console lines. File lines always carry it.
	Timestamps bool
}

// Logger is a slog.Logger writing to a console and/or a log file. It is safe
// for concurrent use.
type Logger struct {
	*slog.Logger
	file *fileWriter // nil without a log file
}

// New builds a Logger from o. It fails for an unknown Format and when the
// log file cannot be opened.
func New(o Options) (*Logger, error) {
	format, err := checkFormat(o.Format)
	if err != nil {
		return nil, err
	}
	var outs []slog.Handler
	if o.Console != nil && o.ConsoleMask != MaskNone {
		outs = append(outs, maskedHandler{
			mask: o.ConsoleMask,
			h:    consoleHandler(o.Console, format, slog.Level(-128), o.Timestamps),
		})
	}
	var fw *fileWriter
	if o.File != "" {
		f, err := openLogFile(o.File)
		if err != nil {
			return nil, err
		}
		fw = &fileWriter{path: o.File, f: f}
		if o.FileMask != MaskNone {
			outs = append(outs, maskedHandler{
				mask: o.FileMask,
				h:    newHandler(fw, format, slog.Level(-128), true),
			})
		}
	}
	return &Logger{Logger: slog.New(slog.NewMultiHandler(outs...)), file: fw}, nil
}

// Reopen closes and reopens the log file under its configured path, so a
// file renamed by logrotate is left behind and new lines go to a fresh file.
// If the new file cannot be opened the old one stays in use and the error is
// returned. Without a log file Reopen does nothing.
func (l *Logger) Reopen() error {
	if l == nil || l.file == nil {
		return nil
	}
	return l.file.reopen()
}

// Tail returns the last n bytes of the log file, or nil if there is no log
// file (or it cannot be read).
func (l *Logger) Tail(n int) []byte {
	if l == nil || l.file == nil || n <= 0 {
		return nil
	}
	return l.file.tail(n)
}

// Close closes the log file. Later records are no longer written to it.
func (l *Logger) Close() error {
	if l == nil || l.file == nil {
		return nil
	}
	return l.file.close()
}

// Simple returns a logger for the daemons that log only to one writer:
// format is "text" (default when empty) or "json" (--log-format), records
// below level are dropped. Lines carry a timestamp (none under journald)
// and the reference's level names.
func Simple(w io.Writer, format string, level slog.Level) (*slog.Logger, error) {
	f, err := checkFormat(format)
	if err != nil {
		return nil, err
	}
	return slog.New(consoleHandler(w, f, level, true)), nil
}

// consoleHandler is newHandler for a console writer: under journald it
// drops the timestamp and prefixes each line with its syslog priority.
func consoleHandler(w io.Writer, format string, minLevel slog.Level, withTime bool) slog.Handler {
	if !UnderJournal(w) {
		return newHandler(w, format, minLevel, withTime)
	}
	pw := &priorityWriter{w: w}
	return &journalHandler{h: newHandler(pw, format, minLevel, false), w: pw}
}

// UnderJournal reports whether w is a file that systemd connected to the
// journal: $JOURNAL_STREAM is "DEVICE:INODE" of the service's stdout or
// stderr stream, and w's descriptor is that stream (not a file or terminal
// the service redirected it to).
func UnderJournal(w io.Writer) bool {
	env := os.Getenv("JOURNAL_STREAM")
	f, ok := w.(*os.File)
	if env == "" || !ok {
		return false
	}
	dev, ino, ok := strings.Cut(env, ":")
	if !ok {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return dev == strconv.FormatUint(st.Dev, 10) && ino == strconv.FormatUint(st.Ino, 10)
}

// SyslogPriority is the syslog priority of a level as journald reads it
// from a "<N>" line prefix: 3 (err) for ERROR, 4 (warning) for WARNING,
// 5 (notice) for MINOR, 6 (info) for INFO and 7 (debug) below.
func SyslogPriority(l slog.Level) int {
	switch levelBit(l) {
	case MaskError:
		return 3
	case MaskWarning:
		return 4
	case MaskMinor:
		return 5
	case MaskInfo:
		return 6
	}
	return 7
}

// journalHandler prefixes each record's line with its syslog priority.
// Its clones (WithAttrs, WithGroup) share the writer and its lock.
type journalHandler struct {
	h slog.Handler
	w *priorityWriter
}

func (j *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return j.h.Enabled(ctx, l)
}

func (j *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	j.w.mu.Lock()
	defer j.w.mu.Unlock()
	j.w.prefix = "<" + strconv.Itoa(SyslogPriority(r.Level)) + ">"
	return j.h.Handle(ctx, r)
}

func (j *journalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &journalHandler{h: j.h.WithAttrs(as), w: j.w}
}

func (j *journalHandler) WithGroup(name string) slog.Handler {
	return &journalHandler{h: j.h.WithGroup(name), w: j.w}
}

// priorityWriter writes each line (one Write per record, as the slog
// handlers do) with the prefix of the record being handled; mu is held by
// journalHandler.Handle around the write.
type priorityWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func (p *priorityWriter) Write(b []byte) (int, error) {
	line := make([]byte, 0, len(p.prefix)+len(b))
	line = append(append(line, p.prefix...), b...)
	if _, err := p.w.Write(line); err != nil {
		return 0, err
	}
	return len(b), nil
}

// checkFormat validates a format name; "" means text.
func checkFormat(format string) (string, error) {
	switch format {
	case "", "text":
		return "text", nil
	case "json":
		return "json", nil
	}
	return "", fmt.Errorf("logging: unknown log format %q: use \"text\" or \"json\"", format)
}

// newHandler returns a slog text or JSON handler writing to w, naming levels
// like the reference and optionally without the time.
func newHandler(w io.Writer, format string, minLevel slog.Level, withTime bool) slog.Handler {
	opts := &slog.HandlerOptions{
		Level: minLevel,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) != 0 {
				return a
			}
			switch a.Key {
			case slog.TimeKey:
				if !withTime {
					return slog.Attr{}
				}
			case slog.LevelKey:
				if l, ok := a.Value.Any().(slog.Level); ok {
					return slog.String(slog.LevelKey, LevelName(l))
				}
			}
			return a
		},
	}
	if format == "json" {
		return slog.NewJSONHandler(w, opts)
	}
	return slog.NewTextHandler(w, opts)
}

// maskedHandler is one output with its level mask: it handles the levels
// the mask has (slog.MultiHandler asks Enabled before each record).
type maskedHandler struct {
	mask Mask
	h    slog.Handler
}

func (m maskedHandler) Enabled(_ context.Context, l slog.Level) bool { return m.mask.Has(l) }

func (m maskedHandler) Handle(ctx context.Context, r slog.Record) error { return m.h.Handle(ctx, r) }

func (m maskedHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return maskedHandler{mask: m.mask, h: m.h.WithAttrs(as)}
}

func (m maskedHandler) WithGroup(name string) slog.Handler {
	return maskedHandler{mask: m.mask, h: m.h.WithGroup(name)}
}

// openLogFile opens path for appending (and reading, for Tail).
func openLogFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log file %s: %w (check the [logging] file setting and the directory's permissions)", path, err)
	}
	return f, nil
}

// fileWriter is the log file: an io.Writer whose file can be swapped.
type fileWriter struct {
	path string
	mu   sync.Mutex
	f    *os.File // nil after close
}

func (w *fileWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return 0, os.ErrClosed
	}
	return w.f.Write(p)
}

func (w *fileWriter) reopen() error {
	nf, err := openLogFile(w.path)
	if err != nil {
		return err
	}
	w.mu.Lock()
	old := w.f
	w.f = nf
	w.mu.Unlock()
	if old != nil {
		if err := old.Close(); err != nil {
			return fmt.Errorf("close old log file %s: %w", w.path, err)
		}
	}
	return nil
}

func (w *fileWriter) tail(n int) []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	st, err := w.f.Stat()
	if err != nil {
		return nil
	}
	size := st.Size()
	off := max(size-int64(n), 0)
	b := make([]byte, size-off)
	k, err := w.f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil
	}
	return b[:k]
}

func (w *fileWriter) close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}

// MaskAtLeast returns the mask of every level at or above min, for a
// threshold-style --log-level flag.
func MaskAtLeast(min slog.Level) Mask {
	var m Mask
	for _, l := range []slog.Level{slog.LevelError, slog.LevelWarn, LevelMinor, slog.LevelInfo, LevelDebug1, LevelDebug2} {
		if l >= min {
			m |= levelBit(l)
		}
	}
	return m
}
