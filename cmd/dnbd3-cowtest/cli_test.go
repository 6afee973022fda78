package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "f")
	writeFilled(t, f, 4096, baseData)
	for _, args := range [][]string{
		{},
		{f},
		{"-t", f, "-v", f},
		{"-t", ""},
		{"-t", f, "extra"},
		{"-c", f, "12Q"},
		{"-c", f, "1M", "2M"},
		{"-r", f},
		{"-x", f},
		{"-x", f, f, f},
		{"-w", f},
		{"-r", f, f, "-y", "120", "-z", "110"},
		{"-r", f, f, "-z", "5000"},
		{"-r", f, f, "-y", "-1"},
		{"-r", f, f, "-z", "abc"},
		{"-r", f, f, "--ops", "-3"},
		{"-t", f, "-d", "abc"},
		{"-t", f, "--duration", "5s"},
		{"-v", f, "-d", "5"},
		{"-x", f, f, "--seed", "1"},
		{"-t", f, "--force"},
		{"-t", f, "--no-such-flag"},
		{"-t", f, "--l2-capacity", "12345"},
		{"-h", "nonsense"},
	} {
		te := newTestEnv(4096)
		code, out := te.run(t, args...)
		if code != exitUsage {
			t.Errorf("%q: exit %d, want %d\n%s", args, code, exitUsage, out)
		}
		if !strings.Contains(out, "dnbd3-cowtest: ") {
			t.Errorf("%q: no error message:\n%s", args, out)
		}
	}
}

func TestHelp(t *testing.T) {
	te := newTestEnv(4096)
	out := te.mustRun(t, 0, "--help")
	mustContain(t, out, "-c, --testFile FILE [SIZE]", "-r, --randomTest MOUNTED NORMAL", "--nbd-cmd", "-z, --maxSizePercent")
	if strings.Contains(out, "l2-capacity") {
		t.Error("the hidden test flag is shown")
	}
	mustContain(t, te.mustRun(t, 0, "-h", "test"), "writeLongNonAlignedPattern", "BLKGETSIZE64")
	mustContain(t, te.mustRun(t, 0, "-h", "randomTest"), "81%", "--seed N --ops K")
}

func TestSecondsValue(t *testing.T) {
	var s secondsValue
	for in, want := range map[string]string{"90": "1m30s", "0": "0", "1m5s": "1m5s", "250ms": "250ms"} {
		if err := s.Set(in); err != nil || s.String() != want {
			t.Errorf("Set(%q): %v, %v", in, s.String(), err)
		}
	}
	for _, in := range []string{"", "x", "-5s"} {
		if err := s.Set(in); err == nil {
			t.Errorf("Set(%q) accepted", in)
		}
	}
}

// -d pauses between the passes of multipleWrites.
func TestDelay(t *testing.T) {
	te := newTestEnv(4096)
	img := filepath.Join(t.TempDir(), "img")
	te.mustRun(t, 0, "-c", img, scaled)
	out := te.mustRun(t, 0, "-t", img, scaled, "-d", "100ms")
	mustContain(t, out, "multipleWrites: waiting 100ms before pass 2", "waiting 100ms before pass 3")
}
