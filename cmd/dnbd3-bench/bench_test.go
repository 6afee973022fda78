package main

import (
	"bytes"
	"context"
	"encoding/json"
	"github.com/dnbd3go/dnbd3go/internal/version"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

func TestHistogramPercentiles(t *testing.T) {
	h := newHistogram()
	if h.percentile(50) != 0 || h.mean() != 0 {
		t.Fatal("empty histogram")
	}
	// 1..100000 ns, uniformly.
	for v := 1; v <= 100000; v++ {
		h.record(time.Duration(v))
	}
	for _, tc := range []struct {
		p    float64
		want float64
	}{{50, 50000}, {90, 90000}, {99, 99000}, {99.9, 99900}, {100, 100000}} {
		got := float64(h.percentile(tc.p))
		if got < tc.want || got > tc.want*1.02 {
			t.Errorf("p%v = %v, want %v (+2%%)", tc.p, got, tc.want)
		}
	}
	if h.max != 100000 || h.min != 1 || h.mean() != 50000 {
		t.Errorf("max %v min %v mean %v", h.max, h.min, h.mean())
	}
	// Exact for small values; merge adds up.
	s := newHistogram()
	for _, v := range []time.Duration{3, 3, 7, 63} {
		s.record(v)
	}
	if s.percentile(50) != 3 || s.percentile(75) != 7 || s.percentile(100) != 63 {
		t.Errorf("small: p50 %v p75 %v p100 %v", s.percentile(50), s.percentile(75), s.percentile(100))
	}
	h.merge(s)
	if h.n != 100004 || h.min != 1 {
		t.Errorf("merge: n %d min %v", h.n, h.min)
	}
	// Bucket bounds are consistent: every value lies at or below its bucket's upper bound.
	for _, v := range []uint64{0, 1, 63, 64, 65, 127, 128, 1000, 1 << 20, 1<<40 + 12345, 1<<63 - 1} {
		b := bucketOf(v)
		if up := bucketUpper(b); up < v || (b > 0 && bucketUpper(b-1) >= v) {
			t.Errorf("value %d in bucket %d with upper %d", v, b, up)
		}
	}
	// Big single value.
	one := newHistogram()
	one.record(3 * time.Second)
	if one.percentile(99.9) != 3*time.Second {
		t.Errorf("single value: %v", one.percentile(99.9))
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		ok   bool
		load bool
		bs   int
	}{
		{[]string{"-h", "x", "-i", "img"}, true, false, 4096},
		{[]string{"-h", "x", "-i", "img", "-b", "64K", "-n", "5", "-t", "3"}, true, false, 65536},
		{[]string{"-h", "x", "-i", "img", "--load"}, true, true, 1 << 20},
		{[]string{"-h", "x", "-i", "img", "--duration", "2s", "--block-size", "4k"}, true, true, 4096},
		{[]string{"-i", "img"}, false, false, 0},
		{[]string{"-h", "x", "-i", "img", "--pattern", "zigzag"}, false, false, 0},
		{[]string{"-h", "x", "-i", "img", "-t", "0"}, false, false, 0},
		{[]string{"-h", "x", "-i", "img", "--queue-depth", "0"}, false, false, 0},
		{[]string{"-h", "x", "-i", "img", "-b", "huge"}, false, false, 0},
		{[]string{"-h", "x", "-i", "img", "stray"}, false, false, 0},
		// the reference's long names
		{[]string{"--host", "x", "--image", "img", "--nruns", "5", "--threads", "2", "--blocksize", "8192"}, true, false, 8192},
	} {
		o, _, err := parseFlags(tc.args, io.Discard, io.Discard)
		if (err == nil) != tc.ok || tc.ok && (o.load != tc.load || o.blockSize != tc.bs) {
			t.Errorf("%v: load %v bs %d err %v", tc.args, o.load, o.blockSize, err)
		}
	}
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"-i", "x"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "required") {
		t.Errorf("bad flags: exit %d, %q", code, errb.String())
	}
	if o, _, err := parseFlags([]string{"-h", "x", "-i", "img", "--nruns", "7"}, io.Discard, io.Discard); err != nil || o.runs != 7 {
		t.Errorf("--nruns 7: runs %d, %v", o.runs, err)
	}
	out.Reset()
	errb.Reset()
	if code := run(context.Background(), []string{"--help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "Usage: dnbd3-bench") || errb.Len() != 0 {
		t.Errorf("--help: exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}
	for _, v := range []string{"--version", "-v"} {
		out.Reset()
		if code := run(context.Background(), []string{v}, &out, &errb); code != 0 || !strings.Contains(out.String(), version.String()) {
			t.Errorf("%s: exit %d, stdout %q", v, code, out.String())
		}
	}
	for _, args := range [][]string{{"-h"}, {"-i", "img", "-h"}, {"-h", "-i", "img"}} {
		errb.Reset()
		if code := run(context.Background(), args, &out, &errb); code != 2 || !strings.Contains(errb.String(), "--help for help") {
			t.Errorf("%v: exit %d, stderr %q", args, code, errb.String())
		}
	}
}

func TestHandshakeMode(t *testing.T) {
	data := make([]byte, 1<<20+333)
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: data})
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"-h", srv.Addr() + " " + srv.Addr(), "-i", "img", "-n", "20", "-t", "3", "-b", "1000"}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s %s", code, out.String(), errb.String())
	}
	s := out.String()
	for _, want := range []string{"Thread #2: Attempts: 20, Success: 20, Fails: 0", "Summary: Attempts: 60, Success: 60, Fails: 0", "handshakes/s"} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
	if srv.Handshakes() != 60 || srv.Blocks() != 60 {
		t.Errorf("server saw %d handshakes, %d blocks", srv.Handshakes(), srv.Blocks())
	}

	// Failures are counted, not fatal; the exit code says so.
	out.Reset()
	code = run(context.Background(), []string{"-h", srv.Addr(), "-i", "nope", "-n", "2", "--json"}, &out, &errb)
	var res struct {
		Mode  string       `json:"mode"`
		Total threadResult `json:"total"`
	}
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || code != 1 || res.Mode != "handshake" || res.Total.Fails != 2 {
		t.Fatalf("unknown image: exit %d, %+v, %v\n%s", code, res, err, out.String())
	}
}

func TestLoadMode(t *testing.T) {
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i)
	}
	a := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: data})
	b := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: data})
	b.Update(func(bh *dnbd3test.Behavior) { bh.Reorder = 4 }) // out-of-order replies are fine
	for _, pattern := range []string{"seq", "rand"} {
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{"-h", a.Addr() + " " + b.Addr(), "-i", "img", "--duration", "300ms",
			"--connections", "3", "--block-size", "64K", "--queue-depth", "4", "--pattern", pattern, "--json"}, &out, &errb)
		var res loadResult
		if err := json.Unmarshal(out.Bytes(), &res); err != nil || code != 0 {
			t.Fatalf("%s: exit %d, %v\n%s\n%s", pattern, code, err, out.String(), errb.String())
		}
		if res.Ops == 0 || res.Errors != 0 || res.Bytes != res.Ops*65536 || res.MBps <= 0 || res.IOPS <= 0 ||
			res.LatencyUS.P50 <= 0 || res.LatencyUS.P50 > res.LatencyUS.P99 || res.LatencyUS.P99 > res.LatencyUS.Max ||
			res.Seconds < 0.3 || res.Seconds > 3 || res.Connections != 3 || res.Pattern != pattern {
			t.Fatalf("%s: %+v", pattern, res)
		}
	}
	// CMD_ERROR replies are counted as errors.
	a.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = true })
	var out bytes.Buffer
	code := run(context.Background(), []string{"-h", a.Addr(), "-i", "img", "--duration", "100ms", "--block-size", "4096"}, &out, io.Discard)
	if code != 1 || !strings.Contains(out.String(), "CMD_ERROR") {
		t.Fatalf("errors: exit %d\n%s", code, out.String())
	}
	// Garbage handles abort the connection with an error.
	a.Update(func(bh *dnbd3test.Behavior) { bh.ErrorAll = false; bh.Garbage = dnbd3test.GarbageUnknownHandle })
	out.Reset()
	code = run(context.Background(), []string{"-h", a.Addr(), "-i", "img", "--duration", "100ms"}, &out, io.Discard)
	if code != 1 || !strings.Contains(out.String(), "never sent") {
		t.Fatalf("garbage: exit %d\n%s", code, out.String())
	}
}

func TestIdleMode(t *testing.T) {
	srv := dnbd3test.Start(t, dnbd3test.Image{Name: "img", Data: make([]byte, 8192)})
	var out, errb bytes.Buffer
	start := time.Now()
	code := run(context.Background(), []string{"-h", srv.Addr(), "-i", "img", "--idle", "20", "--duration", "300ms"}, &out, &errb)
	if code != 0 || !strings.Contains(out.String(), "20 idle connections open") {
		t.Fatalf("exit %d: %s %s", code, out.String(), errb.String())
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("held only %v", d)
	}
	if srv.Handshakes() != 20 {
		t.Errorf("server saw %d handshakes", srv.Handshakes())
	}
	if code := run(context.Background(), []string{"-h", srv.Addr(), "-i", "nope", "--idle", "2", "--duration", "10ms"}, &out, &errb); code != 1 {
		t.Errorf("unknown image: exit %d", code)
	}
}
