package client

import (
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/client/dnbd3test"
)

// BenchmarkReadAt measures pipelined reads from the in-process test
// server (which, not the client, is usually the bottleneck).
func BenchmarkReadAt(b *testing.B) {
	for _, bc := range []struct {
		name    string
		size    int
		readers int
	}{{"4K-x1", 4096, 1}, {"4K-x16", 4096, 16}, {"1M-x8", 1 << 20, 8}} {
		b.Run(bc.name, func(b *testing.B) {
			srv := dnbd3test.Start(b, dnbd3test.Image{Name: "bench", Data: make([]byte, 64<<20)})
			img := openT(b, fastConfig(b, "bench", srv.Addr()))
			b.SetBytes(int64(bc.size))
			b.ResetTimer()
			var wg sync.WaitGroup
			per := b.N/bc.readers + 1
			for r := range bc.readers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, bc.size)
					for k := range per {
						off := int64((r*per+k)*bc.size) % (img.Size() - int64(bc.size))
						if _, err := img.ReadAt(buf, off); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}
