package cowstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/dnbd3go/dnbd3go/cowformat"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// Our files beside the reference's meta, data and status (the reference
// client ignores them).
const (
	revisionName = "revision" // the revision the session is based on
	nameName     = "name"     // the full image name (the header keeps 199 bytes)
	lockName     = "lock"     // flock'd while a process has the session open
)

func revisionFile(dir string) string { return filepath.Join(dir, revisionName) }
func nameFile(dir string) string     { return filepath.Join(dir, nameName) }

// writeRevision records rid in the session's revision file, durably.
func writeRevision(dir string, rid uint16) error {
	return fsutil.WriteFileAtomic(revisionFile(dir), []byte(strconv.Itoa(int(rid))+"\n"), 0o600)
}

func readRevision(dir string) (uint16, error) {
	b, err := os.ReadFile(revisionFile(dir))
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("cowstore: %s: not a revision number: %q", revisionFile(dir), b)
	}
	return uint16(n), nil
}

// ErrNoRevision means a session has no revision record.
var ErrNoRevision = errors.New("cowstore: the session has no revision record")

// SessionRevision returns the revision recorded in a session directory.
func SessionRevision(dir string) (uint16, error) {
	rid, err := readRevision(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, ErrNoRevision
	}
	return rid, err
}

// writeName records the full image name, durably (the exact bytes, no
// newline).
func writeName(dir, name string) error {
	return fsutil.WriteFileAtomic(nameFile(dir), []byte(name), 0o600)
}

// sessionName decides which image a session belongs to, from its name
// record (if any), the name in its header (cut to 199 bytes) and the name
// the caller expects (want, "" for any). record reports that the name
// record is missing and should be written.
func sessionName(dir, header, want string) (full string, record bool, err error) {
	b, err := os.ReadFile(nameFile(dir))
	switch {
	case err == nil:
		full = string(b)
		if truncateName(full) != header {
			return "", false, fmt.Errorf("cowstore: %s names image %q, but the session's header names %q: the directory is corrupt, or its files come from two sessions", nameFile(dir), full, header)
		}
		if want != "" && want != full {
			return "", false, fmt.Errorf("cowstore: the session belongs to image %q, not %q", full, want)
		}
		return full, false, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", false, err
	}
	// no record: a session of the reference client (or of an older
	// dnbd3go), whose header is all there is
	switch {
	case want == "":
		return header, false, nil
	case truncateName(want) != header:
		return "", false, fmt.Errorf("cowstore: the session belongs to image %q, not %q", header, want)
	case want != header:
		return "", false, fmt.Errorf("the session records only the first %d bytes of its image name, which %q shares with other names: "+
			"it cannot tell whether it belongs to that image; if you are sure it does, write the full name into %s (without a newline) and load it again",
			cowformat.NameField-1, want, nameFile(dir))
	}
	return want, true, nil
}

// lockSession takes the session directory's lock, so that no two
// processes open one session (each would hand out the same slots).
func lockSession(dir string) (*os.File, error) {
	f, err := fsutil.LockFile(filepath.Join(dir, lockName))
	var le *fsutil.LockedError
	if errors.As(err, &le) {
		who := "another process"
		if le.PID > 0 {
			who = "process " + strconv.Itoa(le.PID)
		}
		return nil, fmt.Errorf("cowstore: session directory %s is in use by %s (a dnbd3-nbd attach or serve with -c/-L?): stop it first, or use another directory", dir, who)
	}
	if err != nil {
		return nil, fmt.Errorf("lock session directory: %w", err)
	}
	return f, nil
}
