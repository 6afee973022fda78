// Command mergeload drives a merger for bench/50-merger.sh: it creates a
// session, uploads N MiB of changed clusters with P parallel uploads
// (reporting the ingest rate), then requests the merge and reports how
// long it took until the merger said Done.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/cowstore/upload"
)

func main() {
	url := flag.String("merger", "127.0.0.1:5000", "merger address")
	image := flag.String("image", "big", "image name")
	rev := flag.Int("rev", 1, "revision")
	mib := flag.Int("mib", 1024, "MiB of changed clusters to upload")
	imageSize := flag.Int64("size", 4<<30, "image size (originalFileSize and newFileSize)")
	parallel := flag.Int("parallel", 10, "parallel uploads")
	flag.Parse()
	ctx := context.Background()
	m, err := upload.NewMergerClient(*url, upload.MergerConfig{})
	if err != nil {
		fail(err)
	}
	uuid, err := m.Create(ctx, *image, uint16(*rev))
	if err != nil {
		fail(err)
	}
	clusters := *mib << 20 / cowformat.ClusterSize
	maxCluster := int(*imageSize / cowformat.ClusterSize)
	var bits [cowformat.BitfieldSize]byte
	for i := range bits {
		bits[i] = 0xff
	}
	body := make([]byte, cowformat.ClusterSize)
	for i := range body {
		body[i] = byte(rand.Uint32())
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	errs := make(chan error, *parallel)
	for range *parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= clusters {
					return
				}
				// spread the clusters over the image
				c := i * maxCluster / clusters
				if err := m.Update(ctx, uuid, c, bits, body); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail(err)
	}
	up := time.Since(start)
	fmt.Printf("ingest %d MiB in %.2f s: %.1f MB/s with %d parallel uploads\n", clusters*cowformat.ClusterSize>>20, up.Seconds(),
		float64(clusters*cowformat.ClusterSize)/1e6/up.Seconds(), *parallel)
	start = time.Now()
	if err := m.Merge(ctx, uuid, *imageSize, *imageSize); err != nil {
		fail(err)
	}
	for {
		st, err := m.Status(ctx, uuid)
		if err != nil {
			fail(err)
		}
		if st.State == "Done" {
			break
		}
		if st.State == "Failed" {
			fail(fmt.Errorf("merge failed"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("merge %.3f s\n", time.Since(start).Seconds())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mergeload:", err)
	os.Exit(1)
}
