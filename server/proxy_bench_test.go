package server

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
)

// benchProxy starts an origin with a size-byte image and a proxy (conf)
// directly in front of it.
func benchProxy(b *testing.B, size int64, conf, limits string) (origin, proxy *tsrv, data []byte) {
	obase := b.TempDir()
	data = genImage(b, obase, "img.r1", size, true)
	origin = runServer(b, obase, "", nil, nil)
	proxy = startProxy(b, "", conf, limits, nil, origin.addr)
	return origin, proxy, data
}

// BenchmarkProxyBGR256MiB measures full background replication of a
// 256 MiB image over loopback (bgrWindowSize=8, as in the reference's
// measurement).
func BenchmarkProxyBGR256MiB(b *testing.B) {
	for range b.N {
		_, proxy, data := benchProxy(b, 256<<20, "backgroundReplication=true\nbgrWindowSize=8\n", "maxPrefetch=0\n")
		b.SetBytes(int64(len(data)))
		start := time.Now()
		c := benchConnImage(b, proxy.addr, "img")
		c.Close()
		for {
			img := proxy.store.loaded("img", 1)
			if img != nil && !img.incomplete() {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		b.ReportMetric(time.Since(start).Seconds(), "s/image")
		b.StopTimer()
		if fileSHA(b, filepath.Join(proxy.base, "img.r1")) != sha256.Sum256(data) {
			b.Fatal("copy differs")
		}
		proxy.stop()
		b.StartTimer()
	}
}

// BenchmarkColdRead reads a 64 MiB image sequentially with the client
// library, 128 KiB per read (what the FUSE client sends), directly from
// the origin and through a fresh proxy (no background replication, no
// prefetch or the default prefetch of 256 KiB), and in 4 MiB reads that
// the library pipelines as 1 MiB requests.
func BenchmarkColdRead(b *testing.B) {
	const size = 64 << 20
	for _, bc := range []struct {
		name   string
		proxy  bool
		limits string
		chunk  int
	}{
		{"direct/128k", false, "", 128 << 10},
		{"proxy/128k", true, "maxPrefetch=0\n", 128 << 10},
		{"proxy-prefetch/128k", true, "maxPrefetch=262144\n", 128 << 10},
		{"direct/4m", false, "", 4 << 20},
		{"proxy/4m", true, "maxPrefetch=0\n", 4 << 20},
	} {
		b.Run(bc.name, func(b *testing.B) {
			obase := b.TempDir()
			genImage(b, obase, "img.r1", size, false)
			origin := runServer(b, obase, "", nil, nil)
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				addr := origin.addr
				var proxy *tsrv
				if bc.proxy {
					proxy = startProxy(b, "", "", bc.limits, nil, origin.addr)
					addr = proxy.addr
				}
				ci, err := client.Open(context.Background(), client.Config{Servers: []string{addr}, Image: "img", RID: 1, NoProbe: true, Logger: slog.New(slog.DiscardHandler)})
				if err != nil {
					b.Fatal(err)
				}
				buf := make([]byte, bc.chunk)
				b.StartTimer()
				for off := int64(0); off < size; off += int64(len(buf)) {
					if _, err := ci.ReadAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				ci.Close()
				if proxy != nil {
					proxy.stop()
				}
				b.StartTimer()
			}
		})
	}
}
