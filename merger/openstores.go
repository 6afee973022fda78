package merger

import (
	"fmt"
	"os"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Open stores. A session's store (its data file and journal, two
// descriptors, and the index of its clusters in memory) is opened when an
// upload, a merge or a statistics request needs it, not at create time,
// and at most Config.MaxOpenSessions stores are open at once. To open one
// more, the least recently used store that nobody is using is closed: no
// upload in progress (uploadMu), no request holding the session (mu), no
// merge running, and a journal that is not broken (a broken journal stays
// open so that its error stays sticky until the restart). If every open
// store is in use, the caller gets a *BackPressureError. A closed store
// is opened again by replaying its journal, exactly as after a restart.
//
// Lock order: a session's mu, then openMu. Eviction only TryLocks the
// other sessions' locks, so it never waits for them.

// openStoreLocked returns s's store, opening it if it is not open (with
// s.mu held). A merge passes forMerge: it may exceed MaxOpenSessions (the
// number of merges is bounded by MaxConcurrentMerges).
func (m *Manager) openStoreLocked(s *session, forMerge bool) (*store, error) {
	if s.st != nil {
		m.openMu.Lock()
		if s.lru != nil {
			m.openLRU.MoveToFront(s.lru)
		}
		m.openMu.Unlock()
		return s.st, nil
	}
	if s.meta.State == StateDone {
		return nil, fmt.Errorf("merger: session %s is merged; its uploads were deleted", s.meta.UUID)
	}
	if err := m.reserveOpen(s, forMerge); err != nil {
		return nil, err
	}
	st, err := openStore(s.dir, m.log.With("session", s.meta.UUID))
	if err != nil {
		m.openMu.Lock()
		m.openCount--
		m.openMu.Unlock()
		if bp := resourceError(err, "opening a session"); bp != nil {
			m.log.Warn("cannot open a session's uploads", "session", s.meta.UUID, "err", err)
			return nil, bp
		}
		return nil, fmt.Errorf("load session %s: %w", s.meta.UUID, err)
	}
	st.maxClusters = m.maxClusters(s)
	s.st = st
	m.openMu.Lock()
	s.lru = m.openLRU.PushFront(s)
	m.openMu.Unlock()
	return st, nil
}

// reserveOpen counts a store about to be opened, closing idle ones to
// stay within MaxOpenSessions.
func (m *Manager) reserveOpen(s *session, forMerge bool) error {
	m.openMu.Lock()
	defer m.openMu.Unlock()
	for m.openCount >= m.cfg.MaxOpenSessions && !forMerge {
		if !m.evictOneLocked(s) {
			return &BackPressureError{RetryAfter: filesRetryAfter, Reason: fmt.Sprintf(
				"%d sessions are in use at once, the configured maximum", m.cfg.MaxOpenSessions)}
		}
	}
	m.openCount++
	return nil
}

// evictOneLocked closes the least recently used store nobody is using
// (not self's), with m.openMu held. It reports whether it closed one.
func (m *Manager) evictOneLocked(self *session) bool {
	for e := m.openLRU.Back(); e != nil; e = e.Prev() {
		c := e.Value.(*session)
		if c == self || !c.uploadMu.TryLock() {
			continue
		}
		if !c.mu.TryLock() {
			c.uploadMu.Unlock()
			continue
		}
		idle := c.st != nil && !c.running && c.st.j.isBroken() == nil
		if idle {
			c.clusters, c.counted = c.st.clusters(), true
			if err := c.st.close(); err != nil {
				m.log.Warn("closing an idle session's uploads", "session", c.meta.UUID, "err", err)
			}
			c.st = nil
			m.openLRU.Remove(e)
			c.lru = nil
			m.openCount--
		}
		c.mu.Unlock()
		c.uploadMu.Unlock()
		if idle {
			return true
		}
	}
	return false
}

// closeStoreLocked closes s's store if it is open (with s.mu held).
func (m *Manager) closeStoreLocked(s *session) error {
	if s.st == nil {
		return nil
	}
	s.clusters, s.counted = s.st.clusters(), true
	err := s.st.close()
	s.st = nil
	m.openMu.Lock()
	if s.lru != nil {
		m.openLRU.Remove(s.lru)
		s.lru = nil
	}
	m.openCount--
	m.openMu.Unlock()
	return err
}

// maxClusters returns the number of distinct clusters s may hold (see
// Config.SessionQuota).
func (m *Manager) maxClusters(s *session) int {
	quota := m.cfg.SessionQuota
	if quota == 0 {
		size := s.meta.OriginalSize
		if size == 0 { // a session from before OriginalSize was kept
			if st, err := os.Stat(m.originalPath(s.meta.ImageName, s.meta.OriginalRevision)); err == nil {
				size = st.Size()
			}
		}
		quota = max(2*roundUp(size, cowformat.ClusterSize), MinAutoQuota)
	}
	return int(min((quota+cowformat.ClusterSize-1)/cowformat.ClusterSize, cowformat.MaxClusters))
}
