package merger

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/internal/uuid"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// Recovery after a crash or a shutdown. The state in session.json says
// how far a session got, and each step of a merge is persisted before
// the next one depends on it, so a restart can always tell what to do:
//
//	Active           nothing; the journal is replayed when the session is
//	                 next used (acknowledged uploads are all there).
//	Copying/Merging  without a finalize record: the renames have not
//	                 happened, <name>.r<N+1> is not ours. Delete the
//	                 temporary file and its CRC list, merge again from
//	                 scratch.
//	Merging with a   the temporary file and its CRC list (<temp>.crc)
//	finalize record  were complete and synced before the record was
//	                 written; the renames (install.go) are <temp>.crc ->
//	                 <dest>.crc, then <temp> -> <dest>.
//	                 - destination exists with the recorded inode and
//	                   size: both renames happened; finish (Done). (A
//	                   record of an older version without a list: the
//	                   list is computed now if there is none.)
//	                 - else the temporary file exists with that inode:
//	                   the crash came before the second rename, after or
//	                   before the first. Put the list in place (it is
//	                   there already, or the recorded temporary list is
//	                   renamed, or, lost, computed again from the
//	                   image), then rename the image (no-replace; EEXIST
//	                   = conflict, and a list we placed is removed).
//	                 - else merge again from scratch (a list we placed
//	                   for the lost image is removed first).
//	Done             delete uploads left over by a crash right after
//	                 Done was persisted.
//	Failed           nothing (a new Merge request retries).
//
// The new revision only ever appears through the no-replace rename of a
// synced file, so no crash can expose a partial <name>.r<N+1>.

// loadSessions reads every session directory of WorkingDirectory.
// Directories that are not sessions are left alone; a directory of a
// Create that crashed before writing session.json is removed.
func (m *Manager) loadSessions() error {
	entries, err := os.ReadDir(m.cfg.WorkingDirectory)
	if err != nil {
		return fmt.Errorf("read WorkingDirectory: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		if id, ok := uuid.Parse(e.Name()); !ok || id != e.Name() {
			continue
		}
		dir := filepath.Join(m.cfg.WorkingDirectory, e.Name())
		s, err := loadSession(dir)
		if errors.Is(err, fs.ErrNotExist) && incompleteCreate(dir) {
			m.log.Info("removing a session directory whose creation was interrupted", "dir", dir)
			if err := os.RemoveAll(dir); err != nil {
				m.log.Warn("cannot remove directory", "dir", dir, "err", err)
			}
			continue
		}
		if err != nil {
			m.log.Error("ignoring a session directory that cannot be loaded; inspect or remove it", "dir", dir, "err", err)
			continue
		}
		m.sessions[s.meta.UUID] = s
		m.images[imageKey(s.meta.ImageName)]++
	}
	m.log.Info("sessions loaded", "count", len(m.sessions), "dir", m.cfg.WorkingDirectory)
	return nil
}

// incompleteCreate reports whether dir holds nothing but what Create
// writes before session.json.
func incompleteCreate(dir string) bool {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		switch e.Name() {
		case dataFileName, journalFileName, sessionFileName + ".tmp":
		default:
			return false
		}
	}
	return true
}

// recover resumes what a crash or shutdown interrupted (see the table
// above).
func (m *Manager) recover() {
	for _, s := range m.allSessions() {
		m.recoverSession(s)
	}
}

// recoverSession resumes one session after a restart (the table above).
func (m *Manager) recoverSession(s *session) {
	s.mu.Lock()
	state, fin, id := s.meta.State, s.meta.Finalize, s.meta.UUID
	busy := s.running || s.closed || s.deleted
	s.mu.Unlock()
	if busy {
		return
	}
	switch state {
	case StateDone:
		if err := removeStoreFiles(s.dir); err != nil {
			m.log.Warn("cannot delete a merged session's uploads", "session", id, "err", err)
		}
		return
	case StateCopying, StateMerging:
	default:
		return
	}
	if fin != nil && m.recoverFinalized(s, fin, id) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running || (s.meta.State != StateCopying && s.meta.State != StateMerging) {
		return
	}
	m.removeTempLocked(s)
	s.meta.Finalize = nil
	m.log.Info("recovery: merging an interrupted session again", "session", id, "image", s.meta.ImageName, "to", s.meta.NewRevision)
	if !s.closed && !s.deleted { // Close marks sessions closed before it waits for merges
		m.startMergeLocked(s, false)
	}
}

// recoverFinalized handles a session whose merge wrote its finalize
// record (the temporary image and its CRC list were complete): it
// finishes the session if the renames happened, completes them if the
// temporary image is still there (or fails the session on a conflict),
// and reports true in both cases. Otherwise (the image is lost) it
// removes a CRC list it placed for it and reports false: merge again.
func (m *Manager) recoverFinalized(s *session, fin *finalizeRecord, id string) bool {
	if did, err := statID(fin.Dest); err == nil && did == fin.ID {
		m.recoverInstalled(s, fin, id)
		return true
	}
	if tid, err := statID(fin.Temp); err == nil && tid == fin.ID {
		m.log.Info("recovery: completing an interrupted merge's final renames", "session", id, "output", fin.Dest)
		err := m.install(fin, id)
		if err == nil {
			m.finishDone(s, fin.Temp, fin.Dest)
			return true
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		m.removeTempLocked(s)
		if errors.Is(err, fsutil.ErrDestExists) {
			err = conflictError(s.meta.ImageName, s.meta.OriginalRevision)
		} else {
			err = fmt.Errorf("move the new revision into place: %w", err)
		}
		m.failLocked(s, err)
		return true
	}
	m.installMu.Lock()
	removeCRCIf(fin.Dest, fin.CRC)
	m.installMu.Unlock()
	return false
}

// recoverInstalled finishes a session whose revision is in place: the
// temporary name a crash of the link+unlink fallback can leave is
// removed, the CRC list is written if it is missing (a record of an
// older version had none), and the session is Done.
func (m *Manager) recoverInstalled(s *session, fin *finalizeRecord, id string) {
	if tid, err := statID(fin.Temp); err == nil && tid == fin.ID {
		os.Remove(fin.Temp)
	}
	m.log.Info("recovery: the merge had completed before the restart", "session", id, "output", fin.Dest)
	m.installMu.Lock()
	_, err := placeCRC(fin.Dest, fin, false)
	m.installMu.Unlock()
	if err != nil {
		m.log.Error("recovery: cannot write the CRC list of a merged revision", "output", fin.Dest, "err", err)
	}
	m.finishDone(s, fin.Temp, fin.Dest)
}
