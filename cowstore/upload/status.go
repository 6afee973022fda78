package upload

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// statusInfo is what one status report shows.
type statusInfo struct {
	UUID                  string
	State                 string
	InQueue               int     // dirty and due
	ModifiedClusters      int     // dirty, not due yet
	IdleClusters          int     // clean, with a data slot
	TotalClustersUploaded uint64  // successful uploads by this uploader
	ActiveUploads         int64   // requests running now
	AvgSpeedKB            float64 // kB (1000 B) per second since the last report
}

// text renders the report in the reference client's status file format
// (INI, section [General], keys in this order).
func (s statusInfo) text() string {
	return fmt.Sprintf("[General]\nuuid=%s\nstate=%s\ninQueue=%d\nmodifiedClusters=%d\nidleClusters=%d\ntotalClustersUploaded=%d\nactiveUploads=%d\navgSpeedKb=%.2f\n",
		s.UUID, s.State, s.InQueue, s.ModifiedClusters, s.IdleClusters, s.TotalClustersUploaded, s.ActiveUploads, s.AvgSpeedKB)
}

// statusEnabled reports whether status reports go anywhere.
func (u *Uploader) statusEnabled() bool {
	return u.cfg.StatusFile != "" || u.cfg.StatsToLog || u.cfg.StatsOut != nil
}

// counts walks the dirty clusters: due ones and those not due yet. With
// all set (after detach) every dirty cluster is due.
func (u *Uploader) counts(all bool) (due, notDue, clean int) {
	now := u.cfg.Now()
	u.src.DirtyClusters(func(_ int, changed int64) {
		if all || u.due(changed, now) {
			due++
		} else {
			notDue++
		}
	})
	_, clean = u.src.Counts()
	return due, notDue, clean
}

// collectStatus builds a report for state and starts the next speed
// measurement period.
func (u *Uploader) collectStatus(state string) statusInfo {
	due, notDue, clean := u.counts(state != StateBackgroundUpload)
	s := statusInfo{
		UUID:                  u.src.UUID(),
		State:                 state,
		InQueue:               due,
		ModifiedClusters:      notDue,
		IdleClusters:          clean,
		TotalClustersUploaded: u.uploaded.Load(),
		ActiveUploads:         u.active.Load(),
	}
	now, total := u.cfg.Now(), u.bytes.Load()
	if secs := now.Sub(u.lastStatTime).Seconds(); secs > 0 {
		s.AvgSpeedKB = float64(total-u.lastStatBytes) / 1000 / secs
	}
	u.lastStatTime, u.lastStatBytes = now, total
	return s
}

// writeStatus writes one report to the status file and/or the log.
func (u *Uploader) writeStatus(state string) {
	if !u.statusEnabled() {
		return
	}
	u.statusMu.Lock()
	defer u.statusMu.Unlock()
	s := u.collectStatus(state)
	if u.cfg.StatusFile != "" {
		if err := fsutil.ReplaceFile(u.cfg.StatusFile, []byte(s.text()), 0o600); err != nil {
			u.noteStatusError(err)
		}
	}
	if u.cfg.StatsOut != nil {
		io.WriteString(u.cfg.StatsOut, s.text()+"\n") // informational: a closed stdout must not stop uploads
	}
	if u.cfg.StatsToLog {
		u.log.Info("cow upload status",
			"uuid", s.UUID,
			"state", s.State,
			"inQueue", s.InQueue,
			"modifiedClusters", s.ModifiedClusters,
			"idleClusters", s.IdleClusters,
			"totalClustersUploaded", s.TotalClustersUploaded,
			"activeUploads", s.ActiveUploads,
			"avgSpeedKb", fmt.Sprintf("%.2f", s.AvgSpeedKB),
		)
	}
}

// createStatusFile writes the file's first content, once, like the
// reference client: the uuid and state=active.
func (u *Uploader) createStatusFile() {
	if u.cfg.StatusFile == "" {
		return
	}
	u.mu.Lock()
	created := u.statusCreated
	u.statusCreated = true
	u.mu.Unlock()
	if created {
		return
	}
	u.statusMu.Lock()
	defer u.statusMu.Unlock()
	text := fmt.Sprintf("[General]\nuuid=%s\nstate=%s\n", u.src.UUID(), StateActive)
	if err := fsutil.ReplaceFile(u.cfg.StatusFile, []byte(text), 0o600); err != nil {
		u.noteStatusError(err)
	}
}

// noteStatusError logs a failed status write, rate-limited; the status
// file is informational, so uploads go on.
func (u *Uploader) noteStatusError(err error) {
	if ok, suppressed := u.statusLog.allow(time.Now()); ok {
		u.log.Warn("cannot write the COW status file", "err", err, "suppressedSinceLastLog", suppressed)
	}
}

// statusLoop writes a report for state every StatsInterval until ctx
// ends.
func (u *Uploader) statusLoop(ctx context.Context, state string) {
	t := time.NewTicker(u.cfg.StatsInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			u.writeStatus(state)
		}
	}
}
