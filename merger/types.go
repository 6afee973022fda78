// Package merger is the merger service (dnbd3-merger): it receives the
// changed clusters of copy-on-write sessions, stores them durably and, on
// request, merges them with the original image into the image's next
// revision. The HTTP API lives in merger/httpapi; this package holds the
// sessions, their on-disk store and the merge engine.
package merger

import (
	"errors"
	"fmt"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// State is a session's state, as the Status endpoints report it.
type State string

// Session states.
const (
	StateActive  State = "Active"  // accepting uploads
	StateCopying State = "Copying" // merge phase 1: the original is being copied
	StateMerging State = "Merging" // merge phase 2: the clusters are being applied
	StateDone    State = "Done"    // the new revision exists
	StateFailed  State = "Failed"  // the merge failed; Error says why
)

// SessionInfo describes a session.
type SessionInfo struct {
	UUID             string    `json:"uuid"`
	ImageName        string    `json:"imageName"`
	OriginalRevision int       `json:"originalImageVersion"`
	NewRevision      int       `json:"newImageVersion"` // -1 until a merge decided it
	State            State     `json:"state"`
	MergedClusters   int       `json:"mergedClusters"`
	TotalClusters    int       `json:"totalClusters"`
	BitfieldSize     int       `json:"bitfieldSize"`
	OriginalFileSize int64     `json:"originalFileSize"` // from the merge request
	NewFileSize      int64     `json:"newFileSize"`
	Error            string    `json:"error,omitempty"`
	Created          time.Time `json:"created"`
	Updated          time.Time `json:"updated"`
	Output           string    `json:"output,omitempty"` // path of the merged revision once Done
}

// ClusterCount is one entry of GetTopModifiedBlocks.
type ClusterCount struct {
	Cluster       int    `json:"clusterNumber"`
	Modifications uint32 `json:"modifications"`
}

// Update is one uploaded cluster.
type Update struct {
	Cluster  int
	Bitfield [cowformat.BitfieldSize]byte
	// Blocks holds the 4 KiB blocks whose bit is set, ascending
	// (4096 x popcount bytes); with Full set it holds the whole cluster
	// (ClusterSize bytes) as the 2022 API sends it, and only the blocks
	// whose bit is set are stored.
	Blocks []byte
	Full   bool
}

// Errors the Service returns; the HTTP layer maps them to status codes.
var (
	ErrSessionNotFound = errors.New("merger: Session not found")
	ErrImageNotFound   = errors.New("merger: Image not found")
	ErrInvalidName     = errors.New("merger: invalid image name")
	ErrBadRequest      = errors.New("merger: bad request")
	// ErrSessionClosed: uploads to a session that is merging or merged.
	ErrSessionClosed = errors.New("merger: the session no longer accepts uploads (merging or merged)")
	// ErrConflict: the session's base revision is no longer the latest
	// (another session was merged first) - see Manager.Merge.
	ErrConflict = errors.New("merger: conflict")
	// ErrQuotaExceeded: an upload of a new cluster to a session that
	// holds as many clusters as its quota allows (Config.SessionQuota).
	ErrQuotaExceeded = errors.New("merger: session quota exceeded")
)

// BackPressureError asks the client to retry later (503 + Retry-After).
type BackPressureError struct {
	RetryAfter time.Duration
	Reason     string
}

func (e *BackPressureError) Error() string {
	return fmt.Sprintf("busy: %s (retry after %v)", e.Reason, e.RetryAfter)
}

// Service is what the HTTP API drives; *Manager implements it.
type Service interface {
	// Create starts a session for <OriginalImageDirectory>/<imageName>.r<revision>.
	Create(imageName string, revision, bitfieldSize int) (SessionInfo, error)
	// CanUpload reports, before an upload's body is read, whether the
	// session exists and accepts uploads: nil, or the error Update would
	// return for any body (ErrSessionNotFound, ErrSessionClosed,
	// *BackPressureError).
	CanUpload(uuid string) error
	// Update stores one cluster durably (on disk and synced) before it
	// returns; the newest upload of a cluster replaces the previous one.
	// It does not keep u.Blocks after it returns (the caller reuses it).
	Update(uuid string, u Update) error
	// Merge starts (or, if already started or done, reports) the merge
	// into the next revision. It returns without waiting for the merge.
	Merge(uuid string, originalFileSize, newFileSize int64) (SessionInfo, error)
	// Status reports a session.
	Status(uuid string) (SessionInfo, error)
	// TopModified returns up to n clusters with the most uploads.
	TopModified(uuid string, n int) ([]ClusterCount, error)
}
