package cowstore

import (
	"errors"
	"fmt"
)

// ErrFailed is wrapped by every error of a session that a failed sync has
// failed for good (see Overlay.Failed).
var ErrFailed = errors.New("cowstore: session failed")

// failedError is why a session failed.
type failedError struct {
	dir string
	op  string
	err error
}

func (e *failedError) Error() string {
	return fmt.Sprintf("COW session %s failed: %s: %v; the changes since the last successful flush may be lost "+
		"(the kernel may have dropped them), so the session accepts no more writes or flushes: stop it and load it again with -L %s, "+
		"which shows the session as of the last successful flush", e.dir, e.op, e.err, e.dir)
}

func (e *failedError) Unwrap() []error { return []error{ErrFailed, e.err} }

// Failed returns the error that failed the session, or nil. A session
// fails when an fdatasync of its files fails: Linux may already have
// dropped the unsynced pages and reports the error only once, so a retry
// would report success for lost data ("fsyncgate"). From then on every
// write, resize and flush returns this error; reads still work. Loading
// the session again (-L) is the way back.
func (o *Overlay) Failed() error {
	if p := o.failure.Load(); p != nil {
		return *p
	}
	return nil
}

// fail fails the session because op failed with err (the first failure
// wins) and returns the session's error.
func (o *Overlay) fail(op string, err error) error {
	var e error = &failedError{dir: o.dir, op: op, err: err}
	if o.failure.CompareAndSwap(nil, &e) {
		o.log.Error("COW session failed: no more writes are accepted; stop and load it again with -L", "dir", o.dir, "op", op, "err", err)
	}
	return o.Failed()
}

// usable returns the error a write, resize or flush gets instead of
// running: ErrClosed or the session's failure.
func (o *Overlay) usable() error {
	if o.closed.Load() {
		return ErrClosed
	}
	return o.Failed()
}
