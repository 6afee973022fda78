package upload

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
)

// maxFinalRounds bounds the final flush even if every round makes
// progress (which only happens if the overlay is still being written).
const maxFinalRounds = 100

// Result is the outcome of Finish.
type Result struct {
	// UUID is the merger session id ("" if none could be created).
	UUID string
	// Uploaded is the number of successful cluster uploads during Finish.
	Uploaded int
	// TotalUploaded is the number of successful uploads since New
	// (background and final).
	TotalUploaded uint64
	// FailedAttempts is the number of failed upload attempts during Finish
	// (back-pressure replies not included).
	FailedAttempts int
	// Rounds is the number of final-flush rounds run.
	Rounds int
	// Dirty is the number of clusters still not uploaded at the end. They
	// stay dirty in the session, so loading it again (-L) uploads them.
	Dirty int
	// MergeRequested reports that a merge request was sent (merge was asked
	// for and every cluster was uploaded).
	MergeRequested bool
	// MergeAccepted reports that the merger accepted the merge request.
	MergeAccepted bool
	// MergeAttempts is the number of merge requests sent.
	MergeAttempts int
}

// Finish is the final flush at detach. It stops Run (and waits for it),
// then uploads every dirty cluster regardless of MinDelay, FinalParallel at
// a time, in rounds: a round that leaves failed clusters is followed by a
// pause (RetryBackoff, doubling up to MaxBackoff, or the merger's
// Retry-After) and another round, until no cluster is dirty, FinalRounds
// rounds in a row uploaded nothing, or ctx ends.
//
// If merge is set and every cluster was uploaded, it then sends the merge
// request (originalFileSize = ValidRemoteSize, newFileSize = Size), up to
// MergeAttempts times, stopping at the first success.
//
// The status file shows state uploading during the flush and done at the
// end. The error says what went wrong and what the user can do; Result
// holds the numbers either way. The overlay must not be written to any
// more when Finish is called. Finish can be called only once.
func (u *Uploader) Finish(ctx context.Context, merge bool) (Result, error) {
	u.mu.Lock()
	if u.finished {
		u.mu.Unlock()
		return Result{UUID: u.src.UUID()}, ErrFinished
	}
	u.finished = true
	stopRun, runDone := u.stopRun, u.runDone
	u.mu.Unlock()
	if stopRun != nil {
		stopRun()
		select {
		case <-runDone:
		case <-ctx.Done():
			return Result{UUID: u.src.UUID()}, fmt.Errorf("final upload: waiting for the background uploads to stop: %w", ctx.Err())
		}
	}

	u.setState(StateUploading)
	u.createStatusFile()
	u.writeStatus(StateUploading)
	statusCtx, stopStatus := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	if u.statusEnabled() {
		wg.Go(func() { u.statusLoop(statusCtx, StateUploading) })
	}
	defer func() {
		stopStatus()
		wg.Wait()
		u.setState(StateDone)
		u.writeStatus(StateDone)
	}()

	res, err := u.finalFlush(ctx)
	if err != nil || !merge {
		return res, err
	}
	return res, u.merge(ctx, &res)
}

// finalFlush runs the upload rounds of Finish.
func (u *Uploader) finalFlush(ctx context.Context) (Result, error) {
	var (
		res     Result
		lastErr error
		idle    int // rounds in a row without a successful upload
		backoff = u.cfg.RetryBackoff
	)
	for res.Rounds < maxFinalRounds && ctx.Err() == nil {
		// Sit out a pause the merger asked for (also one from Run).
		if !sleep(ctx, u.throttleLeft()) {
			break
		}
		pr := u.pass(ctx, u.cfg.FinalParallel, true)
		res.Rounds++
		res.Uploaded += pr.uploaded
		res.FailedAttempts += pr.failed
		if pr.lastErr != nil {
			lastErr = pr.lastErr
		}
		if dirty, _ := u.src.Counts(); dirty == 0 {
			break
		}
		if pr.uploaded > 0 {
			idle = 0
			if pr.failed == 0 && pr.backPressured == 0 && pr.lastErr == nil {
				continue // progress and no trouble: go on at once
			}
		} else {
			idle++
		}
		if idle >= u.cfg.FinalRounds {
			break
		}
		if u.throttleLeft() > 0 {
			continue // the pause comes at the top of the loop
		}
		if !sleep(ctx, backoff) {
			break
		}
		backoff = min(2*backoff, u.cfg.MaxBackoff)
	}
	res.UUID = u.src.UUID()
	res.TotalUploaded = u.uploaded.Load()
	res.Dirty, _ = u.src.Counts()
	if res.Dirty == 0 {
		return res, nil
	}
	why := lastErr
	if ctx.Err() != nil {
		why = errors.Join(ctx.Err(), lastErr)
	}
	if why == nil {
		why = errors.New("upload: no upload succeeded")
	}
	return res, fmt.Errorf("%d cluster(s) could not be uploaded to the merger after %d round(s), no merge requested; they stay marked dirty in the COW session, load it again with -L to upload them: %w", res.Dirty, res.Rounds, why)
}

// merge sends the merge request with retries.
func (u *Uploader) merge(ctx context.Context, res *Result) error {
	uuid, err := u.EnsureSession(ctx)
	if err != nil {
		return fmt.Errorf("merge: no merger session: %w", err)
	}
	res.UUID = uuid
	orig, size := u.src.ValidRemoteSize(), u.src.Size()
	backoff := u.cfg.RetryBackoff
	for {
		res.MergeRequested = true
		res.MergeAttempts++
		err = u.m.Merge(ctx, uuid, orig, size)
		if err == nil {
			res.MergeAccepted = true
			u.log.Info("merge requested", "uuid", uuid, "originalFileSize", orig, "newFileSize", size, "attempts", res.MergeAttempts)
			return nil
		}
		if ctx.Err() != nil || isPermanent(err) || res.MergeAttempts >= u.cfg.MergeAttempts {
			break
		}
		wait := backoff
		if d, ok := BackPressure(err); ok {
			wait = d
			if wait <= 0 {
				wait = u.cfg.BackPressureDelay
			}
		} else {
			backoff = min(2*backoff, u.cfg.MaxBackoff)
		}
		u.log.Warn("merge request failed; retrying", "uuid", uuid, "attempt", res.MergeAttempts, "wait", wait, "err", err)
		if !sleep(ctx, wait) {
			break
		}
	}
	if ctx.Err() != nil {
		err = errors.Join(ctx.Err(), err)
	}
	var se *StatusError
	if errors.As(err, &se) && se.StatusCode == http.StatusConflict {
		return conflictError(uuid, u.src.ImageName(), u.src.RID(), se)
	}
	return fmt.Errorf("merge request for session %s failed after %d attempt(s); all changes are uploaded, so the merge can be requested again later (load the session with -L and --merge): %w", uuid, res.MergeAttempts, err)
}

// conflictError explains a merge the merger refused with 409 Conflict:
// the revision the session would become exists already (the merger
// builds revision rid+1 from a session based on rid, never rid+2, and
// never replaces a revision), so repeating the request cannot help. The
// changes are still in the COW session.
func conflictError(uuid, image string, rid uint16, se *StatusError) error {
	return fmt.Errorf("the merger refused to merge session %s (HTTP 409, it says: %q): revision %d of %s, which this session "+
		"based on revision %d would become, exists already (another session based on revision %d was merged first, or it was put there), "+
		"and the merger never replaces a revision, so requesting the merge again cannot succeed; the changes are not lost, "+
		"they stay in the COW session: to keep them, read them from it (dnbd3-nbd serve or attach with -L and without -C) "+
		"and write them into a new session started from the latest revision (-c without -r)",
		uuid, se.Body, int(rid)+1, image, rid, rid)
}
