package mergertest

import (
	"errors"
	"fmt"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// MergedImage computes the image a correct merge of session uuid produces
// from original, using the session's latest merge request: original cut
// (or zero-extended) to originalFileSize, every stored cluster's blocks
// whose bit is set written on top, and the result cut or zero-extended to
// newFileSize.
func (s *Server) MergedImage(original []byte, uuid string) ([]byte, error) {
	sess, ok := s.Session(uuid)
	if !ok {
		return nil, fmt.Errorf("mergertest: no session %q", uuid)
	}
	if len(sess.Merges) == 0 {
		return nil, errors.New("mergertest: session " + uuid + " has no merge request")
	}
	m := sess.Merges[len(sess.Merges)-1]
	img := resize(append([]byte(nil), original...), m.OriginalFileSize)
	for idx, c := range sess.Clusters {
		k := 0
		for bit := range cowformat.BitfieldSize * 8 {
			if c.Bitfield[bit/8]&(1<<(bit%8)) == 0 {
				continue
			}
			off := int64(idx)*cowformat.ClusterSize + int64(bit)*cowformat.BlockSize
			if end := off + cowformat.BlockSize; end > int64(len(img)) {
				img = resize(img, end)
			}
			copy(img[off:off+cowformat.BlockSize], c.Blocks[k*cowformat.BlockSize:(k+1)*cowformat.BlockSize])
			k++
		}
	}
	return resize(img, m.NewFileSize), nil
}

// resize cuts b to n bytes or extends it with zeroes.
func resize(b []byte, n int64) []byte {
	if int64(len(b)) >= n {
		return b[:n]
	}
	return append(b, make([]byte, n-int64(len(b)))...)
}
