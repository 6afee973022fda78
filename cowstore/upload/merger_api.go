package upload

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"net/http"
	"strconv"
	"strings"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// API paths, lowercase as the reference client sends them.
const (
	pathCreate = "/v1/file/create"
	pathUpdate = "/v1/file/update"
	pathMerge  = "/v1/file/merge"
	pathStatus = "/v1/file/status"
)

const formType = "application/x-www-form-urlencoded"

// Create opens a merger session for revision rid of image imageName and
// returns its id. The merger must answer 2xx with the bare id (at most
// MaxUUIDLength characters; one trailing newline is tolerated).
func (m *MergerClient) Create(ctx context.Context, imageName string, rid uint16) (string, error) {
	if imageName == "" {
		return "", fmt.Errorf("upload: merger create: no image name")
	}
	body := encodeForm(
		formField{"revision", strconv.Itoa(int(rid))},
		formField{"bitfieldSize", strconv.Itoa(cowformat.BitfieldSize)},
		formField{"imageName", imageName},
	)
	r, err := m.do(ctx, "create", http.MethodPost, m.base+pathCreate, formType, []byte(body))
	if err != nil {
		return "", err
	}
	if !r.ok() {
		e := m.statusError("create", r)
		return "", fmt.Errorf("create merger session for %s r%d: %w%s", imageName, rid, e, statusHint(r.status))
	}
	id := string(r.body)
	id = strings.TrimSuffix(id, "\n")
	id = strings.TrimSuffix(id, "\r")
	if id == "" {
		return "", fmt.Errorf("upload: merger create: HTTP %d with an empty reply, expected the session id", r.status)
	}
	if len(id) > MaxUUIDLength {
		return "", fmt.Errorf("upload: merger create: reply %q is %d characters, expected a bare session id of at most %d (a GUID without quotes): is -C pointing at a v1 merger?", printable(r.body, 60), len(id), MaxUUIDLength)
	}
	if err := checkUUID(id); err != nil {
		return "", fmt.Errorf("merger create: unusable reply: %w", err)
	}
	return id, nil
}

// statusHint suggests what the user can do about a failed reply.
func statusHint(status int) string {
	switch status {
	case http.StatusNotFound:
		return " (does the merger have this image revision?)"
	case http.StatusUnauthorized, http.StatusForbidden:
		return " (check the merger token)"
	}
	return ""
}

// Update uploads one cluster: POST /v1/file/update?uuid=&clusterindex=
// with the 40-byte bitfield followed by blocks, the 4 KiB blocks whose bit
// is set in ascending order (len(blocks) must be 4096 x popcount).
//
// It returns nil on 2xx. Use BackPressure on the error to tell a request to
// slow down (503, 429 or Retry-After, the cluster must stay dirty) from a
// failure.
func (m *MergerClient) Update(ctx context.Context, uuid string, cluster int, bitfield [cowformat.BitfieldSize]byte, blocks []byte) error {
	if err := checkUUID(uuid); err != nil {
		return fmt.Errorf("merger update: %w", err)
	}
	if cluster < 0 || cluster > math.MaxInt32 {
		return fmt.Errorf("upload: merger update: cluster index %d out of range", cluster)
	}
	n := 0
	for _, b := range bitfield {
		n += bits.OnesCount8(b)
	}
	if len(blocks) != n*cowformat.BlockSize {
		return fmt.Errorf("upload: merger update: cluster %d: %d bytes of blocks for %d set bits, want %d (overlay bug)", cluster, len(blocks), n, n*cowformat.BlockSize)
	}
	endpoint := m.base + pathUpdate + "?uuid=" + escape(uuid) + "&clusterindex=" + strconv.Itoa(cluster)
	r, err := m.do(ctx, "update", http.MethodPost, endpoint, "application/octet-stream", bitfield[:], blocks)
	if err != nil {
		return err
	}
	if !r.ok() {
		return m.statusError("update", r)
	}
	return nil
}

// Merge asks the merger to build the next revision from the session:
// the original image cut (or zero-extended) to originalFileSize, the
// uploaded blocks on top, the result cut or extended to newFileSize.
// A 2xx reply means the merger accepted the request; the merge itself may
// run later.
func (m *MergerClient) Merge(ctx context.Context, uuid string, originalFileSize, newFileSize int64) error {
	if err := checkUUID(uuid); err != nil {
		return fmt.Errorf("merger merge: %w", err)
	}
	if originalFileSize < 0 || newFileSize < 0 {
		return fmt.Errorf("upload: merger merge: negative size (%d, %d)", originalFileSize, newFileSize)
	}
	body := encodeForm(
		formField{"originalFileSize", strconv.FormatInt(originalFileSize, 10)},
		formField{"newFileSize", strconv.FormatInt(newFileSize, 10)},
		formField{"uuid", uuid},
	)
	r, err := m.do(ctx, "merge", http.MethodPost, m.base+pathMerge, formType, []byte(body))
	if err != nil {
		return err
	}
	if !r.ok() {
		return m.statusError("merge", r)
	}
	return nil
}

// SessionStatus is the merger's view of a session (GET /v1/file/status).
// The reference service never fills in State (always "Copying") or
// MergedClusters (always 0), and NewImageVersion stays -1.
type SessionStatus struct {
	ImageName            string `json:"imageName"`
	MergedClusters       int64  `json:"mergedClusters"`
	NewImageVersion      int    `json:"newImageVersion"`
	OriginalImageVersion int    `json:"originalImageVersion"`
	// State is one of Copying, Active, Merging, Done, Failed.
	State         string `json:"state"`
	TotalClusters int64  `json:"totalClusters"`
}

// Status asks the merger for a session's state.
func (m *MergerClient) Status(ctx context.Context, uuid string) (SessionStatus, error) {
	var st SessionStatus
	if err := checkUUID(uuid); err != nil {
		return st, fmt.Errorf("merger status: %w", err)
	}
	r, err := m.do(ctx, "status", http.MethodGet, m.base+pathStatus+"?uuid="+escape(uuid), "")
	if err != nil {
		return st, err
	}
	if !r.ok() {
		return st, m.statusError("status", r)
	}
	if err := json.Unmarshal(r.body, &st); err != nil {
		return st, fmt.Errorf("merger status: reply is not the expected JSON (%q): %w", printable(r.body, 80), err)
	}
	return st, nil
}
