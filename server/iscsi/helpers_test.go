package iscsi

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/iscsitest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// memDisk is a Disk in memory. If gate is set, Read waits for it (or the
// context) before answering.
type memDisk struct {
	name string
	rid  uint16
	data []byte
	gate chan struct{}

	mu     sync.Mutex
	closed int
	reads  int
}

func (d *memDisk) Size() int64  { return int64(len(d.data)) }
func (d *memDisk) Name() string { return d.name }
func (d *memDisk) RID() uint16  { return d.rid }
func (d *memDisk) WWN() uint64  { return 0x2000000347000000 | uint64(d.rid) }
func (d *memDisk) Ready(off, n int64) bool {
	return d.gate == nil
}

func (d *memDisk) Read(ctx context.Context, off, n int64) (Data, error) {
	d.mu.Lock()
	d.reads++
	d.mu.Unlock()
	if d.gate != nil {
		select {
		case <-d.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if off < 0 || off+n > int64(len(d.data)) {
		return nil, fmt.Errorf("%w: out of range", ErrMedium)
	}
	return memData(d.data[off : off+n]), nil
}

func (d *memDisk) Close() {
	d.mu.Lock()
	d.closed++
	d.mu.Unlock()
}

// memBackend serves memDisks by target name.
type memBackend struct {
	disks map[string]*memDisk
}

func (b *memBackend) Open(_ context.Context, name string) (Disk, error) {
	if d, ok := b.disks[name]; ok {
		return d, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrTargetNotFound, name)
}

func (b *memBackend) Targets() []string {
	var out []string
	for n := range b.disks {
		out = append(out, n)
	}
	return out
}

// testTarget runs a Target on a loopback listener.
type testTarget struct {
	*Target
	addr string
	disk *memDisk
}

// pattern returns n bytes of a position-dependent pattern.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+3) ^ byte(i>>9)
	}
	return b
}

// startTarget serves a 4 MiB disk "disk" (target name "disk") with the
// given timeout.
func startTarget(t *testing.T, timeout time.Duration) *testTarget {
	t.Helper()
	d := &memDisk{name: "disk", rid: 3, data: pattern(4 << 20)}
	return startTargetWith(t, timeout, map[string]*memDisk{"disk": d}, d)
}

func startTargetWith(t *testing.T, timeout time.Duration, disks map[string]*memDisk, main *memDisk) *testTarget {
	t.Helper()
	tg := New(Config{Backend: &memBackend{disks: disks}, Logger: testutil.Logger(t), Timeout: func() time.Duration { return timeout }})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				tg.Serve(context.Background(), c, bufio.NewReaderSize(c, 1024))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("sessions did not end within 10 s of closing their connections")
		}
	})
	return &testTarget{Target: tg, addr: ln.Addr().String(), disk: main}
}

// dial connects to the target.
func (tt *testTarget) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", tt.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// login logs in to target "disk" with the options given.
func (tt *testTarget) login(t *testing.T, o iscsitest.Options) *iscsitest.Conn {
	t.Helper()
	if o.TargetName == "" {
		o.TargetName = "disk"
	}
	ic, err := iscsitest.Login(tt.dial(t), o)
	if err != nil {
		t.Fatal(err)
	}
	return ic
}
