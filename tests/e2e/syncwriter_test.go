package e2e

import (
	"io"
	"sync"
)

var logMu sync.Mutex

// syncWriter serialises writes of a process's stdout and stderr into one
// buffer that tests read concurrently.
func syncWriter(w io.Writer) io.Writer { return lockedWriter{w} }

type lockedWriter struct{ w io.Writer }

func (l lockedWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	return l.w.Write(p)
}
