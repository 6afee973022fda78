package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

// runIdle opens n connections with a completed handshake, prints a line
// once all are open and keeps them idle (with a KEEPALIVE-free silence the
// server tolerates for about 4 x clientTimeout) for hold or until ctx ends.
// It measures a server's cost per connected client together with a look at
// the server's memory from outside.
func runIdle(ctx context.Context, hosts []string, image string, rid uint16, n int, hold, timeout time.Duration, stdout io.Writer) error {
	var open []*session
	defer func() {
		for _, s := range open {
			s.nc.Close()
		}
	}()
	for i := 0; i < n; i++ {
		s, err := dialSelect(ctx, hosts[i%len(hosts)], image, rid, timeout, 64)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		open = append(open, s)
	}
	fmt.Fprintf(stdout, "%d idle connections open\n", len(open))
	select {
	case <-ctx.Done():
	case <-time.After(hold):
	}
	return nil
}
