package upload

import "time"

// Stats is a snapshot of the uploader for `dnbd3-nbd status`.
type Stats struct {
	// UUID is the merger session id ("" if none yet).
	UUID string
	// State is "" before Run or Finish, else one of StateBackgroundUpload,
	// StateUploading, StateDone.
	State string
	// Due and Waiting split the dirty clusters: Due are old enough to be
	// uploaded (all of them once Finish runs), Waiting are not yet.
	Due, Waiting int
	// Clean is the number of clusters with a data slot and no pending
	// change.
	Clean int
	// ActiveUploads is the number of requests running now.
	ActiveUploads int
	// ClustersUploaded and BytesUploaded count successful uploads (bodies
	// including the bitfield) since New.
	ClustersUploaded, BytesUploaded uint64
	// FailedUploads counts failed upload attempts; BackPressureReplies the
	// replies asking to slow down.
	FailedUploads, BackPressureReplies uint64
	// LastError is the last upload failure ("" if none) and LastErrorAt
	// its time (by Config.Now).
	LastError   string
	LastErrorAt time.Time
	// ThrottledUntil is the (wall clock) time until which uploads are
	// paused because the merger asked to slow down; zero if not paused.
	ThrottledUntil time.Time
}

// Stats returns the uploader's current numbers.
func (u *Uploader) Stats() Stats {
	u.mu.Lock()
	s := Stats{
		State:       u.state,
		LastErrorAt: u.lastErrAt,
	}
	if u.lastErr != nil {
		s.LastError = u.lastErr.Error()
	}
	if time.Until(u.throttleUntil) > 0 {
		s.ThrottledUntil = u.throttleUntil
	}
	u.mu.Unlock()
	s.UUID = u.src.UUID()
	s.Due, s.Waiting, s.Clean = u.counts(s.State == StateUploading || s.State == StateDone)
	s.ActiveUploads = int(u.active.Load())
	s.ClustersUploaded = u.uploaded.Load()
	s.BytesUploaded = u.bytes.Load()
	s.FailedUploads = u.failures.Load()
	s.BackPressureReplies = u.backPressured.Load()
	return s
}
