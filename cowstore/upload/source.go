package upload

import "github.com/dnbd3go/dnbd3go/cowformat"

// Source is the copy-on-write overlay as the uploader sees it. It is
// implemented by *cowstore.Overlay; tests use a fake.
type Source interface {
	// DirtyClusters calls fn for every cluster that has a data slot and
	// changes not yet uploaded, with its absolute cluster index and the unix
	// time (seconds) of its last change.
	DirtyClusters(fn func(index int, changed int64))
	// Counts returns how many clusters with a data slot are dirty and clean.
	Counts() (dirty, clean int)
	// Snapshot returns the cluster's current bitfield, the 4 KiB blocks
	// whose bit is set (ascending, concatenated: 4096 x popcount bytes) and
	// a generation number that changes with every later modification of
	// the cluster.
	Snapshot(index int) (bitfield [cowformat.BitfieldSize]byte, blocks []byte, gen uint64, err error)
	// MarkUploaded records a successful upload of generation gen: the
	// upload counter grows and the failure counter resets; if the cluster
	// has not changed since gen it becomes clean. It reports whether it did.
	MarkUploaded(index int, gen uint64) bool
	// MarkFailed records a failed upload (the failure counter grows); if
	// the cluster has not changed since gen, its change time becomes now so
	// that the next attempt waits a full delay.
	MarkFailed(index int, gen uint64)
	// UUID is the merger session id ("" if none yet); SetUUID stores one.
	UUID() string
	SetUUID(uuid string) error
	// ImageName and RID identify the image the session is based on.
	ImageName() string
	RID() uint16
	// ValidRemoteSize is the part of the original image still valid
	// (originalFileSize of the merge request); Size is the current size
	// (newFileSize).
	ValidRemoteSize() int64
	Size() int64
}
