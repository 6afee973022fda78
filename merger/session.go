package merger

import (
	"container/list"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// A session is a directory <WorkingDirectory>/<uuid>/ (uuid in canonical
// lowercase form) holding
//
//	session.json      the session's state, below; always replaced
//	                  atomically (write session.json.tmp, fsync, rename,
//	                  fsync the directory)
//	clusters.data     uploaded blocks        } see store.go and journal.go;
//	clusters.journal  index of the uploads   } deleted once the merge is done
//	merge.tmp         the merge's output while it is built, when the
//	                  working and destination directories share a file
//	                  system (else a hidden file beside the destination)
//	merge.tmp.crc     its CRC list (crclist.go), beside it in either case
//
// session.json is written at Create, when a merge is accepted (state
// Copying, with the sizes and the new revision), when the copy is done
// (Merging), every few seconds of merge progress, right before the
// result is renamed into place (with a "finalize" record naming the
// temporary file, the destination and the inode, so that a restart can
// tell whether the rename happened), and when the merge ends (Done with
// the output path, or Failed with the reason). Uploads do not touch it.
const (
	sessionFileName = "session.json"
	mergeTempName   = "merge.tmp"
	sessionVersion  = 1
)

// sessionFile is the content of session.json.
type sessionFile struct {
	Version          int       `json:"version"`
	UUID             string    `json:"uuid"`
	ImageName        string    `json:"imageName"`
	OriginalRevision int       `json:"originalRevision"`
	OriginalSize     int64     `json:"originalSize,omitempty"` // at create, for the quota
	NewRevision      int       `json:"newRevision"`            // -1 until a merge is accepted
	BitfieldSize     int       `json:"bitfieldSize"`
	State            State     `json:"state"`
	OriginalFileSize int64     `json:"originalFileSize"`
	NewFileSize      int64     `json:"newFileSize"`
	MergedClusters   int       `json:"mergedClusters"`
	TotalClusters    int       `json:"totalClusters"` // set when a merge is accepted
	Error            string    `json:"error,omitempty"`
	Conflict         bool      `json:"conflict,omitempty"` // Failed because the revision exists
	Created          time.Time `json:"created"`
	Updated          time.Time `json:"updated"`
	Finished         time.Time `json:"finished,omitzero"` // when it became Done or Failed
	Output           string    `json:"output,omitempty"`
	// MergeTemp is the temporary file of the merge in progress.
	MergeTemp string `json:"mergeTemp,omitempty"`
	// Finalize is set, durably, right before MergeTemp is renamed to
	// Dest and cleared when the session is Done or Failed.
	Finalize *finalizeRecord `json:"finalize,omitempty"`
}

// finalizeRecord describes the renames that end a merge: the CRC list
// <Temp>.crc to <Dest>.crc, then Temp to Dest.
type finalizeRecord struct {
	Temp string `json:"temp"`
	Dest string `json:"dest"`
	ID   fileID `json:"id"` // of the synced temporary file
	// CRC identifies the synced temporary CRC list (nil for an empty
	// image, which has none, and in records of older versions).
	CRC *fileID `json:"crc,omitempty"`
}

// session is a session in memory.
//
// Lock order: uploadMu, then mu, then the store's locks.
type session struct {
	dir string
	// uploadMu is held shared by each upload for its whole duration and
	// exclusively by anything that moves the session out of Active (a
	// merge starting, deletion, shutdown), so that once a merge has
	// started no upload is still writing and every upload that returned
	// nil is part of the merge.
	uploadMu sync.RWMutex

	mu         sync.Mutex
	meta       sessionFile
	st         *store    // nil until needed, while evicted, and after Done (see openstores.go)
	lastUpload time.Time // last upload, or Created / the journal's mtime
	uploaded   bool      // the session has received at least one upload
	clusters   int       // clusters stored, when counted and st is nil
	counted    bool
	running    bool // a merge goroutine owns the session
	closed     bool // the manager was closed
	deleted    bool // removed by the retention sweep

	lru *list.Element // in Manager.openLRU while st is open; guarded by Manager.openMu
}

// path returns the path of a file in the session directory.
func (s *session) path(name string) string { return filepath.Join(s.dir, name) }

// persist writes session.json (with mu held).
func (s *session) persist(now time.Time) error {
	s.meta.Updated = now
	b, err := json.MarshalIndent(&s.meta, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(s.path(sessionFileName), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("save state of session %s: %w", s.meta.UUID, err)
	}
	return nil
}

// info returns the session's SessionInfo (with mu held).
func (s *session) info() SessionInfo {
	m := &s.meta
	total := m.TotalClusters
	switch {
	case m.State != StateActive:
	case s.st != nil:
		total = s.st.clusters()
	case s.counted:
		total = s.clusters
	}
	return SessionInfo{
		UUID:             m.UUID,
		ImageName:        m.ImageName,
		OriginalRevision: m.OriginalRevision,
		NewRevision:      m.NewRevision,
		State:            m.State,
		MergedClusters:   m.MergedClusters,
		TotalClusters:    total,
		BitfieldSize:     m.BitfieldSize,
		OriginalFileSize: m.OriginalFileSize,
		NewFileSize:      m.NewFileSize,
		Error:            m.Error,
		Created:          m.Created,
		Updated:          m.Updated,
		Output:           m.Output,
	}
}

// loadSession reads the session in dir.
func loadSession(dir string) (*session, error) {
	path := filepath.Join(dir, sessionFileName)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s := &session{dir: dir}
	if err := json.Unmarshal(b, &s.meta); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m := &s.meta
	switch {
	case m.Version != sessionVersion:
		return nil, fmt.Errorf("merger: %s: unsupported version %d", path, m.Version)
	case m.UUID != filepath.Base(dir):
		return nil, fmt.Errorf("merger: %s: uuid %q does not match the directory", path, m.UUID)
	case !protocol.ValidImageName(m.ImageName):
		return nil, fmt.Errorf("merger: %s: invalid image name %q", path, m.ImageName)
	}
	switch m.State {
	case StateActive, StateCopying, StateMerging, StateDone, StateFailed:
	default:
		return nil, fmt.Errorf("merger: %s: unknown state %q", path, m.State)
	}
	s.lastUpload = m.Created
	s.uploaded = m.State != StateActive
	if st, err := os.Stat(filepath.Join(dir, journalFileName)); err == nil {
		if st.ModTime().After(s.lastUpload) {
			s.lastUpload = st.ModTime()
		}
		s.uploaded = s.uploaded || st.Size() > journalHeaderSize
	}
	return s, nil
}
