package nbdbridge

// Interoperability with the NBD clients of Debian: nbdinfo and nbdcopy
// (libnbd-bin), qemu-img and qemu-io (qemu-utils).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const toolTestSize = 64 << 20

// toolTestRequire skips the test if a client program is missing.
func toolTestRequire(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("SKIP: %s not installed (run scripts/deps.sh)", n)
		}
	}
}

// toolTestRun runs a client program with a timeout and returns stdout.
func toolTestRun(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	out, err := toolTestTry(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func toolTestTry(name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return append(out, stderr.Bytes()...), err
	}
	return out, nil
}

func toolTestFileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != toolTestSize {
		t.Fatalf("%s has %d bytes, want %d", path, len(b), toolTestSize)
	}
	return sha256.Sum256(b)
}

type nbdinfoJSON struct {
	Protocol string `json:"protocol"`
	Exports  []struct {
		Name         string `json:"export-name"`
		Description  string `json:"description"`
		Size         int64  `json:"export-size"`
		ReadOnly     bool   `json:"is_read_only"`
		Rotational   bool   `json:"is_rotational"`
		CanFlush     bool   `json:"can_flush"`
		CanFUA       bool   `json:"can_fua"`
		CanTrim      bool   `json:"can_trim"`
		CanZero      bool   `json:"can_zero"`
		CanMultiConn bool   `json:"can_multi_conn"`
		MinBlock     int    `json:"block_size_minimum"`
		PrefBlock    int    `json:"block_size_preferred"`
		MaxBlock     int    `json:"block_size_maximum"`
	} `json:"exports"`
}

func TestToolsNbdinfo(t *testing.T) {
	toolTestRequire(t, "nbdinfo")
	engTestNoLeak(t)
	for _, ro := range []bool{false, true} {
		m := NewMemoryBackend(toolTestSize)
		m.SetReadOnly(ro)
		s := srvTestStart(t, m, EngineOptions{}, "unix")
		var info nbdinfoJSON
		out := toolTestRun(t, "nbdinfo", "--json", s.uri)
		if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 {
			t.Fatalf("nbdinfo --json: %v\n%s", err, out)
		}
		x := info.Exports[0]
		if info.Protocol != "newstyle-fixed" || x.Name != "disk" || x.Description != "dnbd3go test export" ||
			x.Size != toolTestSize || x.ReadOnly != ro || x.Rotational || !x.CanMultiConn ||
			x.CanFlush == ro || x.CanFUA == ro || x.CanTrim == ro || x.CanZero == ro ||
			x.MinBlock != 1 || x.PrefBlock != 4096 || x.MaxBlock != 32<<20 {
			t.Errorf("read-only %v: nbdinfo shows %+v", ro, info)
		}

		out = toolTestRun(t, "nbdinfo", "--json", "--list", s.uri)
		info = nbdinfoJSON{}
		if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 ||
			info.Exports[0].Name != "disk" || info.Exports[0].Size != toolTestSize {
			t.Errorf("nbdinfo --list: %v\n%s", err, out)
		}
		named := strings.Replace(s.uri, ":///", ":///disk", 1)
		if out := toolTestRun(t, "nbdinfo", "--size", named); strings.TrimSpace(string(out)) != fmt.Sprint(toolTestSize) {
			t.Errorf("nbdinfo --size %s: %s", named, out)
		}
		wrong := strings.Replace(s.uri, ":///", ":///nope", 1)
		if out, err := toolTestTry("nbdinfo", wrong); err == nil {
			t.Errorf("nbdinfo on an unknown export succeeded: %s", out)
		}
		if err := s.stop(); err != nil {
			t.Error(err)
		}
	}
}

func TestToolsNbdcopyRead(t *testing.T) {
	toolTestRequire(t, "nbdcopy")
	engTestNoLeak(t)
	data := engTestRandom(12, toolTestSize)
	want := sha256.Sum256(data)
	m := NewMemoryBackendFrom(data)
	m.SetReadOnly(true)
	dir := t.TempDir()

	for _, network := range []string{"unix", "tcp"} {
		s := srvTestStart(t, m, EngineOptions{}, network)
		out := filepath.Join(dir, network+".img")
		toolTestRun(t, "nbdcopy", s.uri, out)
		if toolTestFileSum(t, out) != want {
			t.Errorf("%s: nbdcopy copy differs", network)
		}

		// Concurrent readers: three nbdcopy at once plus one using four
		// connections (multi-conn).
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		for i := range 4 {
			wg.Go(func() {
				p := filepath.Join(dir, fmt.Sprintf("%s-%d.img", network, i))
				args := []string{s.uri, p}
				if i == 3 {
					args = append([]string{"--connections=4", "--requests=16"}, args...)
				}
				if o, err := toolTestTry("nbdcopy", args...); err != nil {
					errs <- fmt.Errorf("nbdcopy %v: %v: %s", args, err, o)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		for i := range 4 {
			if toolTestFileSum(t, filepath.Join(dir, fmt.Sprintf("%s-%d.img", network, i))) != want {
				t.Errorf("%s: concurrent copy %d differs", network, i)
			}
		}
		st := s.e.Stats()
		if st.TotalConnections < 8 || st.Errors != 0 || st.BytesRead < 5*toolTestSize {
			t.Errorf("%s: stats %+v", network, st)
		}
		t.Logf("%s: %+v", network, st)
		if err := s.stop(); err != nil {
			t.Error(err)
		}
	}
}

func TestToolsNbdcopyWrite(t *testing.T) {
	toolTestRequire(t, "nbdcopy")
	engTestNoLeak(t)
	dir := t.TempDir()
	in := filepath.Join(dir, "in.img")
	data := engTestRandom(13, toolTestSize)
	copy(data[8<<20:], make([]byte, 4<<20)) // a zero run, which nbdcopy may send as WRITE_ZEROES
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	m := NewMemoryBackendFrom(engTestRandom(14, toolTestSize)) // garbage to be overwritten
	s := srvTestStart(t, m, EngineOptions{}, "unix")
	toolTestRun(t, "nbdcopy", "--flush", "--connections=2", in, s.uri)
	if !bytes.Equal(m.Bytes(), data) {
		t.Error("backend contents differ from the copied file")
	}
	if m.Flushes() == 0 || s.e.Stats().Flushes == 0 {
		t.Errorf("nbdcopy --flush did not flush (%d backend flushes, stats %+v)", m.Flushes(), s.e.Stats())
	}
	// And back.
	out := filepath.Join(dir, "out.img")
	toolTestRun(t, "nbdcopy", s.uri, out)
	if toolTestFileSum(t, out) != sha256.Sum256(data) {
		t.Error("read-back differs")
	}
}

func TestToolsQemu(t *testing.T) {
	toolTestRequire(t, "qemu-io", "qemu-img")
	engTestNoLeak(t)
	data := engTestRandom(15, toolTestSize)
	m := NewMemoryBackendFrom(bytes.Clone(data))
	p := &engTestPlain{b: m} // no FUAWriter, Trimmer, ZeroWriter: the engine's fallbacks
	s := srvTestStart(t, p, EngineOptions{}, "unix")

	toolTestRun(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "flush",
		"-c", "write -f -P 0xcd 1M 64k", // FUA
		"-c", "write -z 2M 1M", // WRITE_ZEROES
		"-c", "discard 4M 64k", // TRIM: a no-op without a Trimmer
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "read -P 0 2M 1M",
		s.uri)
	want := bytes.Clone(data)
	copy(want, bytes.Repeat([]byte{0xab}, 1<<20))
	copy(want[1<<20:], bytes.Repeat([]byte{0xcd}, 64<<10))
	clear(want[2<<20 : 3<<20])
	if !bytes.Equal(m.Bytes(), want) {
		t.Error("backend contents after qemu-io differ")
	}
	st := s.e.Stats()
	if st.Flushes < 1 || st.Trims != 1 || st.WriteZeroes != 1 || st.Writes != 2 || st.Errors != 0 {
		t.Errorf("stats after qemu-io: %+v", st)
	}
	if p.flushes.Load() < 2 { // FLUSH and the FUA write
		t.Errorf("backend flushed %d times, want at least 2", p.flushes.Load())
	}

	// qemu-img with its own URI syntax, over unix and TCP.
	dir := t.TempDir()
	out := filepath.Join(dir, "out.img")
	toolTestRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd:unix:"+s.addr, out)
	if toolTestFileSum(t, out) != sha256.Sum256(want) {
		t.Error("qemu-img convert copy differs")
	}
	ts := srvTestStart(t, m, EngineOptions{ReadOnly: true}, "tcp")
	var info struct {
		Size int64 `json:"virtual-size"`
	}
	o := toolTestRun(t, "qemu-img", "info", "--output=json", "nbd://"+ts.addr+"/disk")
	if err := json.Unmarshal(o, &info); err != nil || info.Size != toolTestSize {
		t.Errorf("qemu-img info: %v %s", err, o)
	}
	// qemu refuses to open a READ_ONLY export for writing.
	if o, err := toolTestTry("qemu-io", "-f", "raw", "-c", "write 0 4k", ts.uri); err == nil {
		t.Errorf("qemu-io wrote to a read-only export: %s", o)
	}
	if !bytes.Equal(m.Bytes(), want) {
		t.Error("read-only export was written")
	}
}
