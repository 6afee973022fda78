package cowstore

import "github.com/dnbd3go/dnbd3go/cowformat"

// Local reports whether a read (write false) or a write of n bytes at off
// is served without the remote image, so without a network round trip:
// a read when every block it touches below the valid remote size is in the
// data file; a write when its partial first and last blocks (the only ones
// it may have to complete from the remote image) are in the data file, lie
// above the valid remote size, or are not partial. It is the
// nbdbridge.LocalHinter hint: cheap, never blocking, and allowed to be
// wrong when a concurrent request changes the overlay.
func (o *Overlay) Local(write bool, off, n int64) bool {
	if n <= 0 || off < 0 {
		return true
	}
	valid := o.validSize.Load()
	end := off + n
	if write {
		return o.partialLocal(off, valid) && o.partialLocal(end, valid)
	}
	for pos := off; pos < min(end, valid); {
		cluster := int(pos / cowformat.ClusterSize)
		stop := min(end, valid, int64(cluster+1)*cowformat.ClusterSize)
		if !o.blocksLocal(cluster, pos, stop) {
			return false
		}
		pos = stop
	}
	return true
}

// partialLocal reports whether the block a write boundary at pos falls
// into needs nothing from the remote image: pos is a block boundary, the
// block lies above valid, or it is local.
func (o *Overlay) partialLocal(pos, valid int64) bool {
	if pos%cowformat.BlockSize == 0 || pos/cowformat.BlockSize*cowformat.BlockSize >= valid {
		return true
	}
	return o.blocksLocal(int(pos/cowformat.ClusterSize), pos, pos+1)
}

// blocksLocal reports whether every block of cluster touching [from, to)
// is in the data file.
func (o *Overlay) blocksLocal(cluster int, from, to int64) bool {
	if cluster/cowformat.L2Entries >= cowformat.L1Entries {
		return false
	}
	e := o.lookup(cluster)
	if e == nil {
		return false
	}
	mu := o.lockFor(cluster)
	mu.RLock()
	defer mu.RUnlock()
	if e.offset < 0 {
		return false
	}
	base := int64(cluster) * cowformat.ClusterSize
	for b := int((from - base) / cowformat.BlockSize); b <= int((to-1-base)/cowformat.BlockSize); b++ {
		if !e.has(b) {
			return false
		}
	}
	return true
}
