package cowstore

import (
	"fmt"
	"io"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// ReadAt reads the image: local blocks from the data file, the rest from
// the remote image below validRemoteSize, zeros above it. Reads past the
// image size are clipped and return io.EOF.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if o.closed.Load() {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("cowstore: negative offset %d", off)
	}
	o.sizeMu.RLock()
	defer o.sizeMu.RUnlock()
	size := o.imageSize.Load()
	if off >= size {
		return 0, io.EOF
	}
	n := len(p)
	var eof error
	if int64(n) > size-off {
		n, eof = int(size-off), io.EOF
	}
	if err := o.read(p[:n], off); err != nil {
		return 0, err
	}
	return n, eof
}

// read fills p from off, cluster by cluster; the caller holds sizeMu.
func (o *Overlay) read(p []byte, off int64) error {
	var pend span // a run of non-local bytes, read from remote in one go
	flush := func() error {
		if pend.n == 0 {
			return nil
		}
		err := o.readRemote(p[pend.at:pend.at+pend.n], pend.off)
		pend = span{}
		return err
	}
	for pos := 0; pos < len(p); {
		abs := off + int64(pos)
		cluster := int(abs / cowformat.ClusterSize)
		inCluster := abs % cowformat.ClusterSize
		n := min(len(p)-pos, int(cowformat.ClusterSize-inCluster))
		var bits [cowformat.BitfieldSize]byte
		slot := int64(-1)
		if e := o.lookup(cluster); e != nil {
			mu := o.lockFor(cluster)
			mu.RLock()
			bits, slot = e.bits, e.offset
			mu.RUnlock()
		}
		// isLocal reports whether the block at byte done of this piece is
		// in the data file.
		isLocal := func(done int) bool {
			b := int((inCluster + int64(done)) / cowformat.BlockSize)
			return slot >= 0 && bits[b/8]&(1<<(b%8)) != 0
		}
		// walk the blocks of this cluster piece, grouping runs
		for done := 0; done < n; {
			local := isLocal(done)
			runEnd := done
			for runEnd < n && isLocal(runEnd) == local {
				rb := (inCluster + int64(runEnd)) / cowformat.BlockSize
				runEnd = min(n, int((rb+1)*cowformat.BlockSize-inCluster))
			}
			at := pos + done
			cnt := runEnd - done
			if local {
				if err := flush(); err != nil {
					return err
				}
				fileOff := slot + inCluster + int64(done)
				if k, err := o.data.ReadAt(p[at:at+cnt], fileOff); k < cnt {
					return fmt.Errorf("read data at %d (cluster %d): %w", fileOff, cluster, orEOF(err))
				}
			} else if pend.n > 0 && pend.at+pend.n == at {
				pend.n += cnt
			} else {
				if err := flush(); err != nil {
					return err
				}
				pend = span{at: at, n: cnt, off: off + int64(at)}
			}
			done = runEnd
		}
		pos += n
	}
	return flush()
}

// span is a piece of the request: p[at:at+n] is image bytes from off.
type span struct {
	at, n int
	off   int64
}

// readRemote fills p with image bytes from off that are not local:
// remote data below validRemoteSize, zeros above.
func (o *Overlay) readRemote(p []byte, off int64) error {
	valid := o.validSize.Load()
	k := 0
	if off < valid {
		k = int(min(int64(len(p)), valid-off))
		if n, err := o.remote.ReadAt(p[:k], off); n < k {
			return fmt.Errorf("remote read %d+%d: %w", off, k, orEOF(err))
		}
	}
	clear(p[k:])
	return nil
}

func orEOF(err error) error {
	if err == nil {
		return io.ErrUnexpectedEOF
	}
	return err
}
