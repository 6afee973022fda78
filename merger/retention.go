package merger

import (
	"context"
	"os"
	"time"
)

// Retention: finished sessions (Done or Failed) are deleted
// Config.Retention after they finished, Active ones that received no
// upload for Config.AbandonAfter (after a restart, the journal's mtime
// counts as the last upload), and Active ones that never received one
// Config.AbandonEmptyAfter after they were created (so that sessions
// created and forgotten do not hold the session limits for long). A session that is merging is never
// deleted. Deleting removes the session directory (and with it the
// uploads); the merged revision in DestinationDirectory stays.

// sweepLoop runs sweep every SweepInterval until ctx or the Manager ends.
func (m *Manager) sweepLoop(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.ctx.Done():
			return
		case <-t.C:
			m.sweep()
		}
	}
}

// sweep deletes the sessions that are past their retention.
func (m *Manager) sweep() {
	now := m.now()
	for _, s := range m.allSessions() {
		s.mu.Lock()
		expired := m.expiryReasonLocked(s, now) != ""
		s.mu.Unlock()
		if expired {
			m.deleteSession(s, now)
		}
	}
}

// expiryReasonLocked returns why s should be deleted, or "" (with s.mu
// held).
func (m *Manager) expiryReasonLocked(s *session, now time.Time) string {
	if s.running || s.closed || s.deleted {
		return ""
	}
	switch s.meta.State {
	case StateDone, StateFailed:
		if !s.meta.Finished.IsZero() && now.Sub(s.meta.Finished) >= m.cfg.Retention {
			return "finished longer ago than the retention time"
		}
	case StateActive:
		if now.Sub(s.lastUpload) >= m.cfg.AbandonAfter {
			return "abandoned (no uploads for longer than the abandon time)"
		}
		if !s.uploaded && now.Sub(s.lastUpload) >= m.cfg.AbandonEmptyAfter {
			return "abandoned (no upload at all within the abandon time of empty sessions)"
		}
	}
	return ""
}

// deleteSession removes s if it is still expired once no upload is in
// flight.
func (m *Manager) deleteSession(s *session, now time.Time) {
	s.uploadMu.Lock()
	s.mu.Lock()
	reason := m.expiryReasonLocked(s, now)
	if reason == "" {
		s.mu.Unlock()
		s.uploadMu.Unlock()
		return
	}
	s.deleted = true
	if err := m.closeStoreLocked(s); err != nil {
		m.log.Warn("closing a deleted session's store", "session", s.meta.UUID, "err", err)
	}
	meta := s.meta
	s.mu.Unlock()
	s.uploadMu.Unlock()

	m.mu.Lock()
	delete(m.sessions, meta.UUID)
	m.forgetImageLocked(meta.ImageName)
	m.mu.Unlock()
	if meta.MergeTemp != "" {
		os.Remove(meta.MergeTemp)
	}
	if err := os.RemoveAll(s.dir); err != nil {
		m.log.Error("cannot delete a session directory", "session", meta.UUID, "dir", s.dir, "err", err)
		return
	}
	m.log.Info("session deleted", "session", meta.UUID, "image", meta.ImageName, "revision", meta.OriginalRevision,
		"state", meta.State, "reason", reason, "output", meta.Output)
}
