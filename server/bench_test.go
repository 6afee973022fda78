package server

import (
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// benchImage is a 256 MiB image shared by the benchmarks.
func benchServer(b *testing.B) (*testServer, int64) {
	b.Helper()
	base := b.TempDir()
	const size = 256 << 20
	testutil.WriteGenImage(b, filepath.Join(base, "bench.r1"), size)
	return startBenchServer(b, base), size
}

func startBenchServer(b *testing.B, base string) *testServer {
	dir, cfg := writeConfigDir(b, base, "", nil)
	srv, err := New(Options{ConfigDir: dir, Config: cfg, Version: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	ts := &testServer{Server: srv}
	ts.addr, ts.cancel, ts.done = serveTest(b, srv, "127.0.0.1:0")
	b.Cleanup(ts.stop)
	return ts
}

func benchConn(b *testing.B, addr string) net.Conn { return benchConnImage(b, addr, "bench") }

// benchConnImage connects and selects image name rid 1.
func benchConnImage(b *testing.B, addr, name string) net.Conn {
	d := net.Dialer{KeepAlive: -1}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	p := protocol.SelectImage{Version: 3, Name: name, RID: 1}.Marshal()
	h := protocol.Request{Cmd: protocol.CmdSelectImage, Size: uint32(len(p))}.Marshal()
	c.Write(append(h[:], p...))
	var rh [protocol.ReplySize]byte
	if _, err := io.ReadFull(c, rh[:]); err != nil {
		b.Fatal(err)
	}
	io.CopyN(io.Discard, c, int64(binary.LittleEndian.Uint32(rh[4:])))
	return c
}

// pipelined keeps depth GET_BLOCKs of size bytes in flight on one
// connection for b.N requests.
func pipelined(b *testing.B, size, depth int, random bool) {
	ts, imgSize := benchServer(b)
	c := benchConn(b, ts.addr)
	defer c.Close()
	blocks := imgSize / int64(size)
	b.SetBytes(int64(size))
	b.ResetTimer()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var buf []byte
		for i := 0; i < b.N; i++ {
			off := int64(i) % blocks
			if random {
				off = rand.Int64N(blocks)
			}
			h := protocol.Request{Cmd: protocol.CmdGetBlock, Size: uint32(size), Offset: uint64(off * int64(size)), Handle: uint64(i)}.Marshal()
			buf = append(buf, h[:]...)
			if len(buf) >= 24*depth || i == b.N-1 {
				c.Write(buf)
				buf = buf[:0]
			}
		}
	}()
	data := make([]byte, size)
	var rh [protocol.ReplySize]byte
	for i := 0; i < b.N; i++ {
		if _, err := io.ReadFull(c, rh[:]); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, data); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
}

// BenchmarkSeq1MiBQD8 reads 1 MiB blocks sequentially over one connection.
func BenchmarkSeq1MiBQD8(b *testing.B) { pipelined(b, 1<<20, 8, false) }

// BenchmarkRand4KiBQD32 reads random 4 KiB blocks over one connection.
func BenchmarkRand4KiBQD32(b *testing.B) { pipelined(b, 4096, 32, true) }

// BenchmarkHandshake measures connect, select image, one 4 KiB read, close.
func BenchmarkHandshake(b *testing.B) {
	ts, _ := benchServer(b)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var rh [protocol.ReplySize]byte
		data := make([]byte, 4096)
		for pb.Next() {
			c := benchConn(b, ts.addr)
			h := protocol.Request{Cmd: protocol.CmdGetBlock, Size: 4096, Offset: uint64(rand.Int64N(1000)) * 4096}.Marshal()
			c.Write(h[:])
			io.ReadFull(c, rh[:])
			io.ReadFull(c, data)
			c.Close()
		}
	})
}
