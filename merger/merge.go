package merger

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// Merge points at which Manager.hook is called (tests simulate crashes
// there).
const (
	hookCopied     = "copied"     // the original is copied into the temporary file
	hookApplying   = "applying"   // half of the clusters are applied
	hookSynced     = "synced"     // the temporary file is complete and synced
	hookCRCWritten = "crcwritten" // its CRC list is written and synced, no finalize record yet
	hookFinalizing = "finalizing" // the finalize record is persisted, the renames are next
	hookCRCPlaced  = "crcplaced"  // the CRC list is in place, the image's rename is next
	hookRenamed    = "renamed"    // the new revision is in place, Done is not yet persisted
)

// errSimulatedCrash, returned by a test hook, makes the merge stop on
// the spot as if the process had died: no cleanup, no state change.
var errSimulatedCrash = errors.New("merger: simulated crash")

// progressInterval is how often a running merge persists its progress.
const progressInterval = 5 * time.Second

// Merge merges the session into the image's next revision, in the
// background; it returns the session's state at once.
//
// Sizes: originalFileSize (the client's view of the original, its dnbd3
// virtual size) must lie in [0, size of the original rounded up to
// 4 KiB] and newFileSize in [0, MaxImageSize]; else ErrBadRequest.
//
// Idempotency: for a session that is already Copying, Merging or Done,
// Merge starts nothing and returns its info (the client repeats merge
// requests). A Failed session is merged again from scratch (with the
// sizes of the new request) unless it failed with a conflict.
//
// Revision rule (no silent loss of changes): a session based on revision
// N of NAME always becomes revision N+1, never N+2. If
// <DestinationDirectory>/<NAME>.r<N+1> already exists - because another
// session based on N was merged first, or an administrator put it there -
// the merge fails with an error wrapping ErrConflict and the session
// becomes Failed: "revision N+1 of NAME already exists; this session was
// based on revision N and its changes were not merged; start a new
// session from the latest revision". Merge reports that at once when the
// file exists at request time (returning the Failed info and the error);
// if it appears while the merge runs, the final no-replace rename
// detects it and the session becomes Failed the same way. The existing
// file is never touched. Repeating Merge for such a session returns the
// same error.
//
// The result is built in a temporary file, synced, its CRC list
// (<NAME>.r<N+1>.crc, crclist.go) written and synced, and both are
// renamed into place, the list first, the image without replacing
// anything (install.go), so <NAME>.r<N+1> is either absent or complete
// with its list, also across crashes (see recovery.go).
//
// Other errors: ErrSessionNotFound; ErrImageNotFound if the original has
// disappeared; *BackPressureError when MaxConcurrentMerges merges are
// running or the destination's file system would keep less than
// MinFreeSpace (nothing changes; retry later).
func (m *Manager) Merge(id string, originalFileSize, newFileSize int64) (SessionInfo, error) {
	s, err := m.lookup(id)
	if err != nil {
		return SessionInfo{}, err
	}
	if newFileSize < 0 || newFileSize > MaxImageSize {
		return SessionInfo{}, fmt.Errorf("%w: newFileSize %d is outside [0, %d]", ErrBadRequest, newFileSize, int64(MaxImageSize))
	}
	if originalFileSize < 0 {
		return SessionInfo{}, fmt.Errorf("%w: originalFileSize %d is negative", ErrBadRequest, originalFileSize)
	}
	// Wait for uploads in flight: everything acknowledged is merged.
	s.uploadMu.Lock()
	defer s.uploadMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usableLocked(); err != nil {
		return SessionInfo{}, err
	}
	switch s.meta.State {
	case StateCopying, StateMerging, StateDone:
		return s.info(), nil
	case StateFailed:
		if s.meta.Conflict {
			return s.info(), conflictError(s.meta.ImageName, s.meta.OriginalRevision)
		}
		m.log.Info("retrying failed merge", "session", id, "previous error", s.meta.Error)
	}
	name, rev := s.meta.ImageName, s.meta.OriginalRevision
	origSize, err := m.checkOriginal(name, rev, originalFileSize)
	if err != nil {
		return s.info(), err
	}
	st, err := m.openStoreLocked(s, false)
	if err != nil {
		return s.info(), err
	}
	newRev := rev + 1
	if _, err := os.Lstat(m.destPath(name, newRev)); err == nil {
		cerr := conflictError(name, rev)
		s.meta.NewRevision = newRev
		m.failLocked(s, cerr)
		return s.info(), cerr
	}
	select {
	case m.mergeSlots <- struct{}{}:
	default:
		return s.info(), &BackPressureError{RetryAfter: busyRetryAfter,
			Reason: fmt.Sprintf("%d merges are running, the configured maximum", m.cfg.MaxConcurrentMerges)}
	}
	need := min(min(originalFileSize, origSize)+st.storedBlocks()*cowformat.BlockSize, newFileSize)
	if err := m.checkSpace(m.cfg.DestinationDirectory, need, "the merge"); err != nil {
		<-m.mergeSlots
		return s.info(), err
	}
	if err := m.acceptLocked(s, st.clusters(), originalFileSize, newFileSize, newRev); err != nil {
		<-m.mergeSlots
		return s.info(), err
	}
	m.log.Info("merge accepted", "session", id, "image", name, "from", rev, "to", newRev,
		"originalFileSize", originalFileSize, "newFileSize", newFileSize, "clusters", s.meta.TotalClusters)
	m.startMergeLocked(s, true)
	return s.info(), nil
}

// checkOriginal checks that the session's base revision still exists and
// that the client's originalFileSize fits it; it returns the file's size.
func (m *Manager) checkOriginal(name string, rev int, originalFileSize int64) (int64, error) {
	src := m.originalPath(name, rev)
	ost, err := os.Stat(src)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("%w: %s, the base of this session, was removed; start a new session from an existing revision", ErrImageNotFound, src)
		}
		return 0, fmt.Errorf("base revision: %w", err)
	}
	if limit := roundUp(ost.Size(), cowformat.BlockSize); originalFileSize > limit {
		return 0, fmt.Errorf("%w: originalFileSize %d exceeds the size of %s.r%d (%d bytes, %d rounded up to 4 KiB)",
			ErrBadRequest, originalFileSize, name, rev, ost.Size(), limit)
	}
	return ost.Size(), nil
}

// acceptLocked records durably that the session's merge starts (state
// Copying); on failure the session is left as it was.
func (m *Manager) acceptLocked(s *session, clusters int, originalFileSize, newFileSize int64, newRev int) error {
	prev := s.meta
	s.meta.State = StateCopying
	s.meta.OriginalFileSize, s.meta.NewFileSize = originalFileSize, newFileSize
	s.meta.NewRevision = newRev
	s.meta.MergedClusters, s.meta.TotalClusters = 0, clusters
	s.meta.Error, s.meta.Conflict = "", false
	s.meta.Finished = time.Time{}
	s.meta.MergeTemp, s.meta.Finalize, s.meta.Output = "", nil, ""
	if err := s.persist(m.now()); err != nil {
		s.meta = prev
		if bp := resourceError(err, "starting a merge"); bp != nil {
			return bp
		}
		return fmt.Errorf("save session state: %w", err)
	}
	return nil
}

// conflictError is the error of a merge whose target revision exists.
func conflictError(name string, rev int) error {
	return fmt.Errorf("%w: revision %d of %s already exists; this session was based on revision %d and its changes were not merged; start a new session from the latest revision",
		ErrConflict, rev+1, name, rev)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// startMergeLocked runs the merge of s in the background (with s.mu
// held, s's state Copying or Merging). haveSlot says the caller took a
// merge slot; else the goroutine waits for one.
func (m *Manager) startMergeLocked(s *session, haveSlot bool) {
	s.running = true
	m.wg.Add(1)
	go m.runMerge(s, haveSlot)
}

// runMerge runs a merge and records how it ended. A merge that fails
// because the process has too many files open is paused and tried again
// (an exhausted resource is not the session's fault); any other failure
// marks the session Failed.
func (m *Manager) runMerge(s *session, haveSlot bool) {
	defer m.wg.Done()
	start := time.Now()
	for {
		if !haveSlot {
			select {
			case m.mergeSlots <- struct{}{}:
			case <-m.ctx.Done():
				s.mu.Lock()
				s.running = false
				s.mu.Unlock()
				return
			}
		}
		// The slot is free before the session's end state is visible, so a
		// client that saw Done or Failed can start the next merge at once.
		release := sync.OnceFunc(func() { <-m.mergeSlots })
		err := m.merge(m.ctx, s, release)
		release()
		if m.pauseMerge(s, err) {
			haveSlot = false
			continue
		}
		m.endMerge(s, err)
		m.recordMerge(s, start)
		return
	}
}

// pauseMerge reports whether a merge that ended with err is to be tried
// again: when it ran out of file descriptors before its result was
// complete. It waits Manager.mergeRetry first (or until the Manager
// closes; then the next acquire of a slot ends the merge, which resumes
// at the next start).
func (m *Manager) pauseMerge(s *session, err error) bool {
	if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) {
		return false
	}
	s.mu.Lock()
	if s.meta.Finalize != nil || m.ctx.Err() != nil {
		s.mu.Unlock()
		return false
	}
	m.removeTempLocked(s)
	s.mu.Unlock()
	m.log.Warn("merge paused: the merger has too many files open; it is tried again", "session", s.meta.UUID, "in", m.mergeRetry, "err", err)
	t := time.NewTimer(m.mergeRetry)
	defer t.Stop()
	select {
	case <-t.C:
	case <-m.ctx.Done():
	}
	return true
}

// endMerge records how a merge ended.
func (m *Manager) endMerge(s *session, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.running = false
	switch {
	case err == nil, errors.Is(err, errSimulatedCrash):
		return
	case m.ctx.Err() != nil && errors.Is(err, context.Canceled):
		m.removeTempLocked(s)
		m.log.Info("merge interrupted by shutdown; it starts again when the service starts", "session", s.meta.UUID)
		return
	}
	m.removeTempLocked(s)
	m.failLocked(s, err)
}

// removeTempLocked deletes the merge's temporary file and its temporary
// CRC list, if any.
func (m *Manager) removeTempLocked(s *session) {
	if t := s.meta.MergeTemp; t != "" {
		for _, f := range []string{t, t + crcSuffix} {
			if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
				m.log.Warn("cannot remove a merge's temporary file", "file", f, "err", err)
			}
		}
	}
}

// failLocked marks s Failed with err (with s.mu held).
func (m *Manager) failLocked(s *session, err error) {
	s.meta.State = StateFailed
	s.meta.Error = err.Error()
	s.meta.Conflict = errors.Is(err, ErrConflict)
	s.meta.Finished = m.now()
	s.meta.MergeTemp, s.meta.Finalize = "", nil
	if perr := s.persist(m.now()); perr != nil {
		m.log.Error("cannot save a session's state", "session", s.meta.UUID, "err", perr)
	}
	m.log.Error("merge failed", "session", s.meta.UUID, "image", s.meta.ImageName,
		"from", s.meta.OriginalRevision, "to", s.meta.NewRevision, "conflict", s.meta.Conflict, "err", err)
}

// callHook calls the test hook, if any.
func (m *Manager) callHook(point, uuid string) error {
	if m.hook == nil {
		return nil
	}
	return m.hook(point, uuid)
}

// mergePlan is what one merge attempt works with.
type mergePlan struct {
	uuid             string
	src, dest, temp  string
	originalFileSize int64
	newFileSize      int64
	st               *store
	crc              *crcSources // set by copyPhase; applyPhase records what it writes
}

// plan fixes the paths and sizes of a merge attempt and records the
// temporary file in session.json (so that recovery removes a leftover
// one), with the state Copying.
func (m *Manager) plan(s *session) (*mergePlan, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := m.openStoreLocked(s, true)
	if err != nil {
		return nil, err
	}
	p := &mergePlan{
		uuid:             s.meta.UUID,
		src:              m.originalPath(s.meta.ImageName, s.meta.OriginalRevision),
		dest:             m.destPath(s.meta.ImageName, s.meta.NewRevision),
		originalFileSize: s.meta.OriginalFileSize,
		newFileSize:      s.meta.NewFileSize,
		st:               st,
	}
	destDir := filepath.Dir(p.dest)
	if err := mkdirAllSync(m.cfg.DestinationDirectory, destDir); err != nil {
		return nil, fmt.Errorf("create the destination directory: %w", err)
	}
	// Build the result where a rename into destDir is atomic: the
	// session directory if it is on the same file system, else a hidden
	// file (which dnbd3-server ignores) beside the destination.
	wdev, err1 := deviceOf(s.dir)
	ddev, err2 := deviceOf(destDir)
	if err := errors.Join(err1, err2); err != nil {
		return nil, err
	}
	if wdev == ddev {
		p.temp = s.path(mergeTempName)
	} else {
		p.temp = filepath.Join(destDir, "."+filepath.Base(p.dest)+"."+p.uuid+".merging")
	}
	if s.meta.MergeTemp != p.temp {
		m.removeTempLocked(s)
	}
	s.meta.MergeTemp = p.temp
	s.meta.State = StateCopying
	s.meta.MergedClusters = 0
	if err := s.persist(m.now()); err != nil {
		return nil, err
	}
	return p, nil
}

// merge builds the new revision and moves it into place: copy the
// original (Copying), apply the clusters (Merging), truncate, fsync,
// write and fsync the CRC list, persist the finalize record, rename the
// list and then the image (install.go), fsync the directory, persist
// Done, delete the uploads.
func (m *Manager) merge(ctx context.Context, s *session, release func()) error {
	started := time.Now()
	p, err := m.plan(s)
	if err != nil {
		return err
	}
	if err := os.Remove(p.temp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove leftover temporary file: %w", err)
	}
	if _, err := os.Lstat(p.dest); err == nil {
		return m.conflict(s)
	}

	out, err := os.OpenFile(p.temp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	defer out.Close()

	// Phase 1: the original, as the client saw it.
	used, err := m.copyPhase(ctx, p, out)
	if err != nil {
		return err
	}
	copied := time.Now()
	if err := m.callHook(hookCopied, p.uuid); err != nil {
		return err
	}
	s.mu.Lock()
	s.meta.State = StateMerging
	err = s.persist(m.now())
	s.mu.Unlock()
	if err != nil {
		return err
	}

	// Phase 2: the uploaded clusters.
	if err := m.applyPhase(ctx, s, p, out); err != nil {
		return err
	}
	applied := time.Now()
	fin, crc, err := m.seal(p, out)
	if err != nil {
		return err
	}
	crcDone := time.Now()

	// Phase 3: into place, atomically and without replacing anything.
	s.mu.Lock()
	s.meta.Finalize = fin
	err = s.persist(m.now())
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if err := m.callHook(hookFinalizing, p.uuid); err != nil {
		return err
	}
	if err := m.finalize(s, fin, release); err != nil {
		return err
	}
	m.log.Info("merge done", "session", p.uuid, "output", p.dest, "size", p.newFileSize,
		"copy", used, "copyTime", copied.Sub(started).Round(time.Millisecond),
		"applyTime", applied.Sub(copied).Round(time.Millisecond),
		"crcComputed", crc.computed, "crcFromOriginal", crc.taken, "crcTime", crcDone.Sub(applied).Round(time.Millisecond),
		"total", time.Since(started).Round(time.Millisecond))
	return nil
}

// seal gives the temporary image its size, syncs it, writes and syncs
// its CRC list beside it (crclist.go) and returns the finalize record
// that describes both.
func (m *Manager) seal(p *mergePlan, out *os.File) (*finalizeRecord, crcStats, error) {
	var crc crcStats
	if err := out.Truncate(p.newFileSize); err != nil {
		return nil, crc, fmt.Errorf("set the size of the new revision: %w", err)
	}
	if err := out.Sync(); err != nil {
		return nil, crc, fmt.Errorf("sync the new revision: %w", err)
	}
	if err := m.callHook(hookSynced, p.uuid); err != nil {
		return nil, crc, err
	}
	id, err := statID(p.temp)
	if err != nil {
		return nil, crc, err
	}
	fin := &finalizeRecord{Temp: p.temp, Dest: p.dest, ID: id}
	if p.newFileSize > 0 { // an empty image has no hash blocks
		crcID, st, err := m.writeCRCTemp(p, out)
		if err != nil {
			return nil, crc, err
		}
		fin.CRC, crc = &crcID, st
	}
	return fin, crc, m.callHook(hookCRCWritten, p.uuid)
}

// conflict fails the merge because the destination exists.
func (m *Manager) conflict(s *session) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return conflictError(s.meta.ImageName, s.meta.OriginalRevision)
}

// copyPhase copies the first min(originalFileSize, size) bytes of the
// original into out and sets out's size to originalFileSize.
func (m *Manager) copyPhase(ctx context.Context, p *mergePlan, out *os.File) (CopyMethod, error) {
	src, err := os.Open(p.src) // read-only: the original is never locked or changed
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: %s, the base of this session, was removed", ErrImageNotFound, p.src)
		}
		return "", err
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return "", err
	}
	n := min(p.originalFileSize, fi.Size())
	p.crc = newCRCSources(fi.Size(), p.originalFileSize, p.newFileSize)
	used, err := copyOriginal(ctx, out, src, n, n == fi.Size(), m.cfg.CopyMethod)
	if err != nil {
		return used, fmt.Errorf("copy %s: %w", p.src, err)
	}
	if err := out.Truncate(p.originalFileSize); err != nil {
		return used, err
	}
	return used, nil
}

// applyPhase writes every cluster's current blocks into out, verifying
// each version's CRC first, and reports progress.
func (m *Manager) applyPhase(ctx context.Context, s *session, p *mergePlan, out *os.File) error {
	versions := p.st.snapshot()
	s.mu.Lock()
	s.meta.TotalClusters = len(versions)
	s.mu.Unlock()
	buf := make([]byte, cowformat.ClusterSize)
	lastPersist := time.Now()
	for i := range versions {
		if err := ctx.Err(); err != nil {
			return err
		}
		v := &versions[i]
		base := int64(v.cluster) * cowformat.ClusterSize
		if base < p.newFileSize {
			blocks, err := p.st.readVersion(v, buf)
			if err != nil {
				return err
			}
			k := 0
			for r := range bitRuns(&v.bitfield) {
				off := base + int64(r.first)*cowformat.BlockSize
				n := r.n
				// Blocks entirely at or beyond the new end are cut anyway.
				if lim := (p.newFileSize - off + cowformat.BlockSize - 1) / cowformat.BlockSize; int64(n) > lim {
					n = int(max(lim, 0))
				}
				if n > 0 {
					if _, err := out.WriteAt(blocks[k*cowformat.BlockSize:(k+n)*cowformat.BlockSize], off); err != nil {
						return fmt.Errorf("write cluster %d: %w", v.cluster, err)
					}
					p.crc.touch(off, int64(n)*cowformat.BlockSize)
				}
				k += r.n
			}
		}
		s.mu.Lock()
		s.meta.MergedClusters = i + 1
		if time.Since(lastPersist) >= progressInterval {
			lastPersist = time.Now()
			if err := s.persist(m.now()); err != nil {
				m.log.Warn("cannot save merge progress", "session", p.uuid, "err", err)
			}
		}
		s.mu.Unlock()
		if i+1 == (len(versions)+1)/2 {
			if err := m.callHook(hookApplying, p.uuid); err != nil {
				return err
			}
		}
	}
	return nil
}

// finalize installs the synced result (its CRC list, then the image,
// without replacing a revision) and marks s Done. The finalize record is
// already persisted. release frees the merge slot.
func (m *Manager) finalize(s *session, fin *finalizeRecord, release func()) error {
	s.mu.Lock()
	uuid := s.meta.UUID
	s.mu.Unlock()
	if err := m.install(fin, uuid); err != nil {
		if errors.Is(err, fsutil.ErrDestExists) {
			return m.conflict(s)
		}
		return fmt.Errorf("move the new revision into place: %w", err)
	}
	if err := m.callHook(hookRenamed, uuid); err != nil {
		return err
	}
	release()
	m.finishDone(s, fin.Temp, fin.Dest)
	return nil
}

// finishDone makes the rename of temp to dest durable, persists Done and
// deletes the session's uploads. The new revision exists at this point,
// so errors are only logged (a restart finishes the job).
func (m *Manager) finishDone(s *session, temp, dest string) {
	if err := fsutil.SyncDir(filepath.Dir(dest)); err != nil {
		m.log.Warn("cannot sync the destination directory", "err", err)
	}
	if filepath.Dir(temp) != filepath.Dir(dest) {
		if err := fsutil.SyncDir(filepath.Dir(temp)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			m.log.Warn("cannot sync a directory", "err", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.meta.State = StateDone
	s.meta.Output = dest
	s.meta.MergedClusters = s.meta.TotalClusters
	s.meta.Finished = m.now()
	s.meta.Error = ""
	s.meta.MergeTemp, s.meta.Finalize = "", nil
	if err := s.persist(m.now()); err != nil {
		m.log.Error("cannot save a merged session's state; a restart will finish it", "session", s.meta.UUID, "err", err)
		return
	}
	if err := m.closeStoreLocked(s); err != nil {
		m.log.Warn("closing a session's store", "session", s.meta.UUID, "err", err)
	}
	if err := removeStoreFiles(s.dir); err != nil {
		m.log.Warn("cannot delete a merged session's uploads", "session", s.meta.UUID, "err", err)
	}
	if err := fsutil.SyncDir(s.dir); err != nil && !errors.Is(err, syscall.ENOENT) {
		m.log.Warn("cannot sync a session directory", "err", err)
	}
}
