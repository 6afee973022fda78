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

// AsyncReader is implemented by backends that can start a read without a
// goroutine waiting for it (the DNBD3 client library's Image does). The
// engine then starts READs from its reader goroutine and writes each
// reply from the goroutine that completes the read: no worker and no
// writer hand-off per request, which under emulation or on a loaded
// machine costs more than the I/O itself.
type AsyncReader interface {
	// StartRead starts reading len(p) bytes at off, a range within Size.
	// t.ReadDone is called exactly once with the outcome (nil once p holds
	// the data), possibly before StartRead returns, and must not block.
	StartRead(p []byte, off int64, t ReadTarget)
	// SendStarted submits the reads started so far. The engine calls it
	// when no further request is waiting in its buffer, so a burst of
	// requests from the kernel becomes one write to the server.
	SendStarted()
}

// LocalHinter is implemented by backends that can tell cheaply whether a
// request is served from local storage or memory only, without waiting on
// the network (a copy-on-write overlay: blocks of its data file and zeros
// are local, remote blocks are not). The engine runs such a request inline
// in the connection's reader when it is alone in flight, whatever the
// recent average cost of its kind: a worker and writer hand-off per
// request costs more than the I/O under emulation or on a loaded machine.
type LocalHinter interface {
	// Local reports whether a READ (write false) or WRITE (write true)
	// of n bytes at off needs no network round trip. It must be cheap and
	// must not block.
	Local(write bool, off, n int64) bool
}

// ReadTarget receives the outcome of an AsyncReader's read.
type ReadTarget interface {
	ReadDone(err error)
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
