package server

import (
	"context"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Verify recomputes the CRC-32 of every hash block of the image and returns
// the indexes of blocks that do not match its CRC list (none if the image
// has no list).
func (img *Image) Verify(ctx context.Context) ([]int, error) {
	list := img.CRCList()
	if list == nil {
		return nil, nil
	}
	buf := make([]byte, 1<<20)
	var bad []int
	for i, want := range list {
		if err := ctx.Err(); err != nil {
			return bad, err
		}
		got, err := protocol.BlockCRC(img.file, img.RealSize, i, buf)
		if err != nil {
			img.problems.Or(ProblemRead)
			return bad, err
		}
		if got != want {
			bad = append(bad, i)
		}
	}
	return bad, nil
}
