package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

func TestParseMask(t *testing.T) {
	cases := []struct {
		in   string
		want Mask
		str  string
	}{
		{"ERROR WARNING MINOR INFO", DefaultConsoleMask, "ERROR WARNING MINOR INFO"},
		{"ERROR WARNING MINOR INFO DEBUG1", DefaultFileMask, "ERROR WARNING MINOR INFO DEBUG1"},
		{"DEBUG1", MaskDebug1, "DEBUG1"},
		{"DEBUG2", MaskDebug2, "DEBUG2"},
		{"DEBUG1 DEBUG2", MaskDebug1 | MaskDebug2, "DEBUG1 DEBUG2"},
		{"ERROR,INFO", MaskError | MaskInfo, "ERROR INFO"},
		{"xxERRORyyWARNINGzz", MaskError | MaskWarning, "ERROR WARNING"},
		{"error warning", MaskNone, ""}, // case-sensitive like the reference
		{"", MaskNone, ""},
		{"DEBUG", MaskNone, ""},
		{"INFO DEBUG2 ERROR MINOR WARNING DEBUG1", MaskAll, "ERROR WARNING MINOR INFO DEBUG1 DEBUG2"},
	}
	for _, c := range cases {
		got := ParseMask(c.in)
		if got != c.want {
			t.Errorf("ParseMask(%q) = %#x, want %#x", c.in, got, c.want)
		}
		if got.String() != c.str {
			t.Errorf("ParseMask(%q).String() = %q, want %q", c.in, got.String(), c.str)
		}
		if ParseMask(got.String()) != got {
			t.Errorf("round trip of %q failed", c.in)
		}
	}
}

func TestLevels(t *testing.T) {
	if slog.LevelError != 8 || slog.LevelWarn != 4 || LevelMinor != 2 || slog.LevelInfo != 0 || LevelDebug1 != -4 || LevelDebug2 != -8 {
		t.Fatal("level values differ from the documented ones")
	}
	names := map[slog.Level]string{
		12: "ERROR", 8: "ERROR", 5: "WARNING", 4: "WARNING", 3: "MINOR", 2: "MINOR",
		1: "INFO", 0: "INFO", -1: "DEBUG1", -4: "DEBUG1", -5: "DEBUG2", -8: "DEBUG2", -20: "DEBUG2",
	}
	for l, n := range names {
		if got := LevelName(l); got != n {
			t.Errorf("LevelName(%d) = %s, want %s", l, got, n)
		}
	}
	m := MaskError | MaskDebug1
	if !m.Has(slog.LevelError) || !m.Has(LevelDebug1) || m.Has(slog.LevelWarn) || m.Has(LevelDebug2) || m.Has(slog.LevelInfo) {
		t.Errorf("Mask.Has wrong for %s", m)
	}
	for in, want := range map[string]slog.Level{"error": 8, "WARN": 4, "warning": 4, "minor": 2, "Info": 0, "debug": -4, "debug1": -4, "debug2": -8} {
		got, err := ParseLevel(in)
		if err != nil || got != want {
			t.Errorf("ParseLevel(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseLevel("loud"); err == nil || !strings.Contains(err.Error(), "debug2") {
		t.Errorf("ParseLevel(loud) error = %v, want one listing the valid names", err)
	}
}

func logAll(l *slog.Logger) {
	l.Error("e1")
	l.Warn("w1")
	l.Log(context.Background(), LevelMinor, "m1")
	l.Info("i1")
	l.Log(context.Background(), LevelDebug1, "d1")
	l.Log(context.Background(), LevelDebug2, "d2")
}

func msgs(t *testing.T, b []byte) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		i := strings.Index(line, "msg=")
		if i < 0 {
			t.Fatalf("no msg in %q", line)
		}
		out = append(out, strings.Fields(line[i+4:])[0])
	}
	return out
}

func TestMasksPerOutput(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "dnbd3.log")
	var con bytes.Buffer
	lg, err := New(Options{
		Console:     &con,
		ConsoleMask: ParseMask("ERROR WARNING MINOR INFO"),
		File:        path,
		FileMask:    ParseMask("ERROR DEBUG2"),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer lg.Close()
	logAll(lg.Logger)
	if got := strings.Join(msgs(t, con.Bytes()), ","); got != "e1,w1,m1,i1" {
		t.Errorf("console got %s", got)
	}
	fb, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(msgs(t, fb), ","); got != "e1,d2" {
		t.Errorf("file got %s", got)
	}
	// Level names, and timestamps: always in the file, not on the console by default.
	if !strings.Contains(con.String(), "level=MINOR msg=m1") || !strings.Contains(con.String(), "level=WARNING msg=w1") {
		t.Errorf("console lacks reference level names:\n%s", con.String())
	}
	if strings.Contains(con.String(), "time=") {
		t.Errorf("console has timestamps without Timestamps:\n%s", con.String())
	}
	if !strings.HasPrefix(string(fb), "time=") || !strings.Contains(string(fb), "level=DEBUG2 msg=d2") {
		t.Errorf("file lines lack time or level:\n%s", fb)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm()&^0o640 != 0 {
		t.Errorf("log file mode %v, want at most 0640", st.Mode().Perm())
	}
}

func TestConsoleTimestampsAndAttrs(t *testing.T) {
	var con bytes.Buffer
	lg, err := New(Options{Console: &con, ConsoleMask: MaskAll, Timestamps: true})
	if err != nil {
		t.Fatal(err)
	}
	if lg.Tail(4000) != nil {
		t.Error("Tail without a file should be nil")
	}
	if err := lg.Reopen(); err != nil {
		t.Errorf("Reopen without a file: %v", err)
	}
	lg.With("image", "test").WithGroup("g").Info("hello", "k", 1)
	s := con.String()
	if !strings.HasPrefix(s, "time=") || !strings.Contains(s, `level=INFO msg=hello image=test g.k=1`) {
		t.Errorf("unexpected line %q", s)
	}
	if lg.Enabled(context.Background(), LevelDebug2) != true {
		t.Error("MaskAll should enable DEBUG2")
	}
	lg2, _ := New(Options{Console: &con, ConsoleMask: MaskError})
	if lg2.Enabled(context.Background(), slog.LevelInfo) {
		t.Error("INFO enabled with an ERROR-only mask")
	}
}

func TestJSONFormat(t *testing.T) {
	var con bytes.Buffer
	lg, err := New(Options{Format: "json", Console: &con, ConsoleMask: MaskAll})
	if err != nil {
		t.Fatal(err)
	}
	lg.Log(context.Background(), LevelMinor, "minor thing", "n", 7)
	var m map[string]any
	if err := json.Unmarshal(con.Bytes(), &m); err != nil {
		t.Fatalf("not JSON: %q: %v", con.String(), err)
	}
	if m["level"] != "MINOR" || m["msg"] != "minor thing" || m["n"] != float64(7) {
		t.Errorf("unexpected record %v", m)
	}
	if _, ok := m["time"]; ok {
		t.Errorf("console JSON has time without Timestamps: %v", m)
	}
}

func TestBadFormatAndFile(t *testing.T) {
	_, err := New(Options{Format: "xml"})
	if err == nil || !strings.Contains(err.Error(), `"text"`) || !strings.Contains(err.Error(), `"json"`) {
		t.Errorf("New(xml) error = %v, want one naming text and json", err)
	}
	if _, err := Simple(os.Stderr, "yaml", 0); err == nil {
		t.Error("Simple(yaml) succeeded")
	}
	bad := filepath.Join(t.TempDir(), "no", "such", "dir", "log")
	_, err = New(Options{File: bad, FileMask: MaskAll})
	if err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("New with unopenable file: error = %v, want one naming the path", err)
	}
}

func TestTailReopen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "server.log")
	if err := os.WriteFile(path, []byte("old content\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lg, err := New(Options{File: path, FileMask: MaskAll})
	if err != nil {
		t.Fatal(err)
	}
	defer lg.Close()
	lg.Info("first")
	all, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(all), "old content\ntime=") {
		t.Fatalf("file not appended to: %q", all)
	}
	if got := lg.Tail(1 << 20); !bytes.Equal(got, all) {
		t.Errorf("Tail(big) = %q, want whole file %q", got, all)
	}
	if got := lg.Tail(10); !bytes.Equal(got, all[len(all)-10:]) {
		t.Errorf("Tail(10) = %q, want %q", got, all[len(all)-10:])
	}

	rotated := path + ".1"
	if err := os.Rename(path, rotated); err != nil {
		t.Fatal(err)
	}
	lg.Info("second") // still goes to the renamed file
	if err := lg.Reopen(); err != nil {
		t.Fatal(err)
	}
	lg.Info("third")
	old, _ := os.ReadFile(rotated)
	cur, _ := os.ReadFile(path)
	if got := strings.Join(msgs(t, old[len("old content\n"):]), ","); got != "first,second" {
		t.Errorf("rotated file has %s", got)
	}
	if got := strings.Join(msgs(t, cur), ","); got != "third" {
		t.Errorf("new file has %s", got)
	}
	if got := lg.Tail(4000); !bytes.Equal(got, cur) {
		t.Errorf("Tail after reopen = %q, want %q", got, cur)
	}

	// A failing reopen keeps the old file: a directory in the file's place
	// cannot be opened for writing, not even by root.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := lg.Reopen(); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Reopen onto a directory: error = %v, want one naming the path", err)
	}
	lg.Info("fourth")
	if got := string(lg.Tail(200)); !strings.Contains(got, "msg=fourth") {
		t.Errorf("after failed reopen the old file is not used: %q", got)
	}
	if err := lg.Close(); err != nil {
		t.Fatal(err)
	}
	lg.Info("after close") // must not panic
	if lg.Tail(10) != nil {
		t.Error("Tail after Close should be nil")
	}
}

func TestConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.log")
	var con testutil.Buffer
	lg, err := New(Options{Console: &con, ConsoleMask: MaskAll, File: path, FileMask: MaskAll})
	if err != nil {
		t.Fatal(err)
	}
	defer lg.Close()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				lg.Info("line", "i", i)
				if i%25 == 0 {
					_ = lg.Reopen()
					_ = lg.Tail(100)
				}
			}
		}()
	}
	wg.Wait()
	b, _ := os.ReadFile(path)
	if n := strings.Count(string(b), "msg=line"); n != 800 {
		t.Errorf("file has %d lines, want 800", n)
	}
	if n := strings.Count(con.String(), "msg=line"); n != 800 {
		t.Errorf("console has %d lines, want 800", n)
	}
}

func TestSimple(t *testing.T) {
	var b bytes.Buffer
	l, err := Simple(&b, "", slog.LevelInfo)
	if err != nil {
		t.Fatal(err)
	}
	l.Debug("hidden")
	l.Warn("shown", "x", "y")
	s := b.String()
	if strings.Contains(s, "hidden") || !strings.Contains(s, "level=WARNING msg=shown x=y") || !strings.HasPrefix(s, "time=") {
		t.Errorf("Simple text output %q", s)
	}
	b.Reset()
	l, err = Simple(&b, "json", LevelDebug2)
	if err != nil {
		t.Fatal(err)
	}
	l.Log(context.Background(), LevelDebug2, "deep")
	var m map[string]any
	if err := json.Unmarshal(b.Bytes(), &m); err != nil || m["level"] != "DEBUG2" || m["time"] == nil {
		t.Errorf("Simple json output %q (%v)", b.String(), err)
	}
}

func TestMaskAtLeast(t *testing.T) {
	if MaskAtLeast(slog.LevelInfo) != DefaultConsoleMask {
		t.Errorf("info: %v", MaskAtLeast(slog.LevelInfo))
	}
	if MaskAtLeast(slog.LevelWarn) != MaskError|MaskWarning || MaskAtLeast(LevelDebug2) != MaskAll {
		t.Error("warn/debug2")
	}
}

// journalFile returns a file standing in for the journal stream systemd
// gives a service, with JOURNAL_STREAM set to its device and inode.
func journalFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", sys.Dev, sys.Ino))
	return f
}

func TestJournalPriorities(t *testing.T) {
	f := journalFile(t)
	lg, err := New(Options{Console: f, ConsoleMask: MaskAll, Timestamps: true})
	if err != nil {
		t.Fatal(err)
	}
	log := lg.With("image", "ubuntu")
	log.Error("e")
	log.Warn("w")
	log.Log(context.Background(), LevelMinor, "m")
	log.Info("i")
	log.Debug("d1")
	log.Log(context.Background(), LevelDebug2, "d2")
	got, _ := os.ReadFile(f.Name())
	want := `<3>level=ERROR msg=e image=ubuntu
<4>level=WARNING msg=w image=ubuntu
<5>level=MINOR msg=m image=ubuntu
<6>level=INFO msg=i image=ubuntu
<7>level=DEBUG1 msg=d1 image=ubuntu
<7>level=DEBUG2 msg=d2 image=ubuntu
`
	if string(got) != want {
		t.Fatalf("journal lines:\n%s\nwant (priority prefix, no time):\n%s", got, want)
	}
}

func TestJournalJSONAndSimple(t *testing.T) {
	f := journalFile(t)
	log, err := Simple(f, "json", slog.LevelInfo)
	if err != nil {
		t.Fatal(err)
	}
	log.Warn("careful", "n", 1)
	log.Debug("dropped")
	got, _ := os.ReadFile(f.Name())
	if want := `<4>{"level":"WARNING","msg":"careful","n":1}` + "\n"; string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestNotUnderJournal(t *testing.T) {
	f := journalFile(t)
	other, err := os.Create(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	// JOURNAL_STREAM names f; a service that redirected its stderr
	// elsewhere (other) writes plain lines with a timestamp.
	log, err := Simple(other, "text", slog.LevelInfo)
	if err != nil {
		t.Fatal(err)
	}
	log.Error("plain")
	got, _ := os.ReadFile(other.Name())
	if !strings.HasPrefix(string(got), "time=") || !strings.Contains(string(got), "level=ERROR msg=plain") {
		t.Fatalf("got %q, want a plain line with its own time", got)
	}
	var buf bytes.Buffer
	if UnderJournal(&buf) || !UnderJournal(f) {
		t.Fatal("UnderJournal: want false for a buffer, true for the stream JOURNAL_STREAM names")
	}
	t.Setenv("JOURNAL_STREAM", "")
	if UnderJournal(f) {
		t.Fatal("UnderJournal without JOURNAL_STREAM")
	}
}
