package cowstore

import (
	"io"
	"os"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
)

// storeFile is what the overlay needs of its meta and data files. The
// files are *os.File in production; tests wrap them (Options.wrapFile) to
// record writes, inject errors or stop the process at a chosen write or
// sync.
type storeFile interface {
	io.ReaderAt
	io.WriterAt
	// Datasync makes the file's written data durable (fdatasync).
	Datasync() error
	Close() error
}

// osFile is a storeFile on disk.
type osFile struct{ *os.File }

func (f osFile) Datasync() error { return fsutil.Fdatasync(f.File) }

// wrap returns the storeFile for one of the session's files ("meta" or
// "data").
func (o *Options) wrap(name string, f *os.File) storeFile {
	if o.wrapFile != nil {
		return o.wrapFile(name, osFile{f})
	}
	return osFile{f}
}
