package upload

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// outcome is the result of one cluster upload.
type outcome int

const (
	outOK           outcome = iota // uploaded (the cluster may still be dirty if it changed meanwhile)
	outCanceled                    // the context ended; the cluster stays dirty
	outBackPressure                // the merger asked to slow down; the cluster stays dirty
	outFailed                      // the merger rejected the upload
	outUnreachable                 // transport failure: the merger did not answer
	outLocal                       // the cluster could not be read from the overlay
)

// passResult sums up one pass.
type passResult struct {
	uploaded      int
	failed        int
	backPressured int
	lastErr       error
}

// candidate is a dirty cluster chosen for a pass.
type candidate struct {
	index   int
	changed int64
}

// candidates lists the dirty clusters to upload, oldest change first:
// all of them in the final flush, else those at least MinDelay old.
func (u *Uploader) candidates(final bool) []candidate {
	now := u.cfg.Now()
	var cs []candidate
	u.src.DirtyClusters(func(index int, changed int64) {
		if final || u.due(changed, now) {
			cs = append(cs, candidate{index, changed})
		}
	})
	slices.SortFunc(cs, func(a, b candidate) int {
		return cmp.Or(cmp.Compare(a.changed, b.changed), cmp.Compare(a.index, b.index))
	})
	return cs
}

// due reports whether a change at unix time changed is at least MinDelay
// old.
func (u *Uploader) due(changed int64, now time.Time) bool {
	return now.Sub(time.Unix(changed, 0)) >= u.cfg.MinDelay
}

// pass uploads the candidate clusters, at most parallel at a time, and
// waits for its uploads to end. It stops queueing new uploads when ctx
// ends, when the merger asks to slow down, or when it cannot be reached.
// Passes never overlap (Run runs them one after another, Finish only once
// Run has ended), so a cluster is never uploaded twice at the same time.
func (u *Uploader) pass(ctx context.Context, parallel int, final bool) passResult {
	cands := u.candidates(final)
	var pr passResult
	if len(cands) == 0 {
		return pr
	}
	uuid, err := u.EnsureSession(ctx)
	if err != nil {
		if ctx.Err() == nil {
			u.noteFailure(err)
		}
		pr.lastErr = err
		return pr
	}

	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		halt atomic.Bool
		sem  = make(chan struct{}, parallel)
	)
	stop := func() bool { return ctx.Err() != nil || halt.Load() || u.throttleLeft() > 0 }
queue:
	for _, c := range cands {
		if stop() {
			break
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break queue
		}
		if stop() {
			<-sem
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			o, err := u.uploadOne(ctx, uuid, c.index)
			mu.Lock()
			defer mu.Unlock()
			switch o {
			case outOK:
				pr.uploaded++
			case outBackPressure:
				pr.backPressured++
				halt.Store(true)
			case outUnreachable:
				pr.failed++
				halt.Store(true)
			case outFailed, outLocal:
				pr.failed++
			}
			if err != nil && o != outCanceled {
				pr.lastErr = err
			}
		})
	}
	wg.Wait()
	return pr
}

// uploadOne snapshots a cluster, uploads it and records the result in the
// overlay: MarkUploaded on success (the cluster stays dirty if it changed
// during the upload), nothing on back-pressure or cancellation (it stays
// dirty and due), MarkFailed on any other failure.
func (u *Uploader) uploadOne(ctx context.Context, uuid string, index int) (outcome, error) {
	bitfield, blocks, gen, err := u.src.Snapshot(index)
	if err != nil {
		err = fmt.Errorf("read cluster %d from the COW data file: %w", index, err)
		u.noteFailure(err)
		u.failures.Add(1)
		u.src.MarkFailed(index, gen)
		return outLocal, err
	}
	u.active.Add(1)
	err = u.m.Update(ctx, uuid, index, bitfield, blocks)
	u.active.Add(-1)
	if err == nil {
		u.uploaded.Add(1)
		u.bytes.Add(uint64(cowformat.BitfieldSize + len(blocks)))
		if !u.src.MarkUploaded(index, gen) {
			u.log.Debug("cluster changed during its upload; it stays dirty", "cluster", index)
		}
		return outOK, nil
	}
	if ctx.Err() != nil {
		return outCanceled, err
	}
	if d, ok := BackPressure(err); ok {
		if d <= 0 {
			d = u.cfg.BackPressureDelay
		}
		u.throttle(d)
		u.backPressured.Add(1)
		if ok, suppressed := u.bpLog.allow(time.Now()); ok {
			u.log.Info("merger asked to slow down; pausing uploads", "pause", d, "cluster", index, "reply", err, "suppressedSinceLastLog", suppressed)
		}
		return outBackPressure, err
	}
	err = fmt.Errorf("upload cluster %d: %w", index, err)
	u.noteFailure(err)
	u.failures.Add(1)
	u.src.MarkFailed(index, gen)
	var se *StatusError
	if errors.As(err, &se) {
		return outFailed, err
	}
	return outUnreachable, err
}
