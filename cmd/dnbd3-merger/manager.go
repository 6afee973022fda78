package main

import (
	"context"
	"fmt"

	"github.com/dnbd3go/dnbd3go/merger"
)

// service is the merge engine as the command uses it: the Service the
// HTTP API drives, and Close for the shutdown.
type service interface {
	merger.Service
	// Close persists the state and stops the engine; merges in progress
	// resume at the next start.
	Close() error
}

// openFunc creates and starts the merge engine; tests pass a fake.
type openFunc func(ctx context.Context, cfg merger.Config) (service, error)

// openManager creates the real merger.Manager (loading the sessions found
// in the working directory) and starts it (resuming interrupted merges and
// the retention sweeps, which run until ctx ends or Close).
func openManager(ctx context.Context, cfg merger.Config) (service, error) {
	m, err := merger.NewManager(cfg)
	if err != nil {
		return nil, err
	}
	if err := m.Start(ctx); err != nil {
		_ = m.Close()
		return nil, fmt.Errorf("start the merger: %w", err)
	}
	return m, nil
}
