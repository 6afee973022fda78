package nbdbridge

// Benchmarks of the transmission engine over socketpairs, with a client
// that behaves like the kernel's: one write per request, header and data
// read separately, a fixed queue depth per connection. They measure the
// engine, not a backend: the backend is a MemoryBackend.
//
//	go test -run XXX -bench Engine -benchtime 3s ./nbdbridge/

import (
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

const benchExportSize = 64 << 20

type benchPattern struct {
	cmd    uint16
	length uint32
	qd     int
	conns  int
	random bool
}

func BenchmarkEngineRead4KRandomQD1(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdRead, length: 4096, qd: 1, conns: 1, random: true})
}

func BenchmarkEngineRead4KRandomQD32(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdRead, length: 4096, qd: 32, conns: 1, random: true})
}

func BenchmarkEngineRead4KRandom4ConnsQD32(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdRead, length: 4096, qd: 32, conns: 4, random: true})
}

func BenchmarkEngineWrite4KRandomQD32(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdWrite, length: 4096, qd: 32, conns: 1, random: true})
}

func BenchmarkEngineRead1MSeqQD1(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdRead, length: 1 << 20, qd: 1, conns: 1})
}

func BenchmarkEngineRead1MSeqQD4(b *testing.B) {
	benchEngine(b, benchPattern{cmd: wireCmdRead, length: 1 << 20, qd: 4, conns: 1})
}

func benchEngine(b *testing.B, p benchPattern) {
	e := NewEngine(NewMemoryBackendFrom(engTestRandom(1, benchExportSize)), EngineOptions{})
	defer e.Close()
	type conn struct {
		cli net.Conn
		res chan error
	}
	conns := make([]conn, p.conns)
	for i := range conns {
		srv, cli := engTestSocketPair(b)
		conns[i] = conn{cli: cli, res: make(chan error, 1)}
		go func() { conns[i].res <- e.ServeConn(context.Background(), srv) }()
	}
	b.SetBytes(int64(p.length))
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range conns {
		n := b.N / p.conns
		if i < b.N%p.conns {
			n++
		}
		wg.Go(func() { benchClient(b, c.cli, p, n, uint64(i)) })
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
	for _, c := range conns {
		var d [wireRequestSize]byte
		putRequest(d[:], protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST, Type: wireCmdDisc})
		c.cli.Write(d[:])
		<-c.res
	}
}

// benchClient runs n requests with p.qd in flight on one connection.
func benchClient(b *testing.B, cli net.Conn, p benchPattern, n int, seed uint64) {
	slots := make(chan uint64, p.qd)
	for i := range p.qd {
		slots <- uint64(i)
	}
	sendErr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(seed, 1))
		blocks := uint64(benchExportSize / p.length)
		req := make([]byte, wireRequestSize+int(p.length))
		if p.cmd != wireCmdWrite {
			req = req[:wireRequestSize]
		}
		var seq uint64
		for range n {
			slot := <-slots
			var off uint64
			if p.random {
				off = rng.Uint64N(blocks) * uint64(p.length)
			} else {
				off = seq % blocks * uint64(p.length)
				seq++
			}
			putRequest(req, protocol.TransmissionRequestHeader{RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST,
				Type: p.cmd, Handle: slot, Offset: off, Length: p.length})
			if _, err := cli.Write(req); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	var hdr [wireReplySize]byte
	data := make([]byte, p.length)
	for range n {
		if _, err := io.ReadFull(cli, hdr[:]); err != nil {
			b.Error(err)
			return
		}
		if binary.BigEndian.Uint32(hdr[4:]) != 0 {
			b.Errorf("error reply %x", hdr)
			return
		}
		if p.cmd == wireCmdRead {
			if _, err := io.ReadFull(cli, data); err != nil {
				b.Error(err)
				return
			}
		}
		slots <- binary.BigEndian.Uint64(hdr[8:])
	}
	if err := <-sendErr; err != nil {
		b.Error(err)
	}
}
