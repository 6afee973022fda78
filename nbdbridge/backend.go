package nbdbridge

import "errors"

// Backend is the storage an NBD export serves. The same Backend serves the
// kernel (/dev/nbdX through socketpairs) and NBD clients on a socket
// (QEMU, libnbd tools), so everything above the kernel is testable without
// root.
//
// Implementations must be safe for concurrent use: the engine calls them
// from a pool of workers. ReadAt must fill p completely or return an error
// (a short read is an error, reported to the client as EIO). A read that
// cannot be served within the backend's own deadline returns an error
// rather than blocking forever.
type Backend interface {
	// ReadAt reads len(p) bytes at off.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. Read-only backends return ErrReadOnly.
	WriteAt(p []byte, off int64) (int, error)
	// Size returns the export size in bytes.
	Size() int64
	// Flush makes every write that completed before the call durable.
	Flush() error
}

// Trimmer is implemented by backends that can discard a range (NBD_CMD_TRIM).
type Trimmer interface {
	Trim(off, length int64) error
}

// ZeroWriter is implemented by backends that can write zeros without a
// payload (NBD_CMD_WRITE_ZEROES). noHole asks for allocated zeros.
type ZeroWriter interface {
	WriteZeroes(off, length int64, noHole bool) error
}

// Resizer is implemented by backends whose size can change.
type Resizer interface {
	Resize(size int64) error
}

// FUAWriter is implemented by backends that can make a single write durable
// more cheaply than WriteAt followed by Flush (NBD_CMD_FLAG_FUA).
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// ReadOnlyBackend is implemented by backends that never accept writes; the
// engine then answers writes with EPERM and the kernel device is read-only.
type ReadOnlyBackend interface {
	ReadOnly() bool
}

// ErrReadOnly is returned by WriteAt of read-only backends.
var ErrReadOnly = errors.New("nbdbridge: backend is read-only")

// IsReadOnly reports whether b declares itself read-only.
func IsReadOnly(b Backend) bool {
	ro, ok := b.(ReadOnlyBackend)
	return ok && ro.ReadOnly()
}
