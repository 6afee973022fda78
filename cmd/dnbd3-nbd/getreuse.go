package main

import (
	"context"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/internal/progress"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// `dnbd3-nbd get --reuse OLDFILE`: an admin staging revision N+1 who has
// revision N locally fetches only what changed. The server's CRC list
// (GET_CRC32: one CRC-32 per 16 MiB hash block) says what each block of
// the new revision must hold; a block of OLDFILE at the same place whose
// CRC matches is taken from OLDFILE, every other block is fetched. Every
// block, taken or fetched, is checked against the list before it is
// written out.

// reuseResult counts what a reuse copy took from where.
type reuseResult struct {
	reused, fetched int64 // bytes
	reusedBlocks    int   // hash blocks taken from the old file
	blocks          int   // hash blocks of the image
	checked         bool  // every block was checked against the CRC list
}

// reuseCopy writes the whole image img (virtual size) to w, taking the
// hash blocks whose CRC in list matches old's from old and fetching the
// others with copyRange's parallel reads.
func reuseCopy(ctx context.Context, img *client.Image, old *os.File, w io.Writer, list []uint32, bs, parallel int, bar *progress.Bar) (reuseResult, error) {
	size := img.Size()
	res := reuseResult{blocks: len(list), checked: true}
	same, err := sameBlocks(old, size, list)
	if err != nil {
		return res, err
	}
	cw := &crcCheckWriter{w: w, list: list, size: size, h: crc32.NewIEEE()}
	buf := make([]byte, protocol.HashBlockSize)
	for hb := 0; hb < len(list); {
		start := int64(hb) * protocol.HashBlockSize
		if same[hb] {
			end := min(start+protocol.HashBlockSize, size)
			if err := readPadded(old, buf[:end-start], start); err != nil {
				return res, err
			}
			if _, err := cw.Write(buf[:end-start]); err != nil {
				return res, err
			}
			if bar != nil {
				bar.Add(end - start)
			}
			res.reused += end - start
			res.reusedBlocks++
			hb++
			continue
		}
		next := hb
		for next < len(list) && !same[next] {
			next++
		}
		end := min(int64(next)*protocol.HashBlockSize, size)
		n, err := copyRange(ctx, img, cw, start, end, bs, parallel, bar)
		res.fetched += n
		if err != nil {
			return res, err
		}
		hb = next
	}
	return res, nil
}

// sameBlocks reports for each hash block of an image of size bytes
// whether old holds it at the same place with the CRC list says.
func sameBlocks(old *os.File, size int64, list []uint32) ([]bool, error) {
	st, err := old.Stat()
	if err != nil {
		return nil, err
	}
	oldSize := st.Size()
	same := make([]bool, len(list))
	buf := make([]byte, 1<<20)
	for hb := range list {
		start := int64(hb) * protocol.HashBlockSize
		end := min(start+protocol.HashBlockSize, size)
		if end != min(start+protocol.HashBlockSize, protocol.VirtualSize(oldSize)) {
			continue // not the same range in the old file
		}
		crc, err := protocol.BlockCRC(old, oldSize, hb, buf)
		if err != nil {
			return nil, fmt.Errorf("--reuse %s: %w", old.Name(), err)
		}
		same[hb] = crc == list[hb]
	}
	return same, nil
}

// readPadded fills p from f at off; bytes past f's end are zeros (the
// 4 KiB padding of an image's last block).
func readPadded(f *os.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if err == io.EOF {
		err = nil
	}
	clear(p[n:])
	if err != nil {
		return fmt.Errorf("--reuse %s: %w", f.Name(), err)
	}
	return nil
}

// crcCheckWriter passes an image, written in order from offset 0, on to
// w one hash block at a time, after checking each block's CRC against
// list: nothing unchecked is written.
type crcCheckWriter struct {
	w       io.Writer
	list    []uint32
	size    int64 // virtual size: the last block ends here
	off     int64
	h       hash.Hash32
	pending []byte // the current block so far
}

func (c *crcCheckWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		hb := c.off / protocol.HashBlockSize
		end := min((hb+1)*protocol.HashBlockSize, c.size)
		if c.off >= end {
			return written, fmt.Errorf("data past the end of the image (%d bytes)", c.size)
		}
		k := min(int64(len(p)), end-c.off)
		c.h.Write(p[:k])
		c.pending = append(c.pending, p[:k]...)
		c.off += k
		written += int(k)
		p = p[k:]
		if c.off < end {
			continue
		}
		if got := c.h.Sum32(); got != c.list[hb] {
			return written, fmt.Errorf("hash block %d (bytes %d-%d) fails its CRC check: %#08x, the server's CRC list says %#08x",
				hb, hb*protocol.HashBlockSize, end, got, c.list[hb])
		}
		if _, err := c.w.Write(c.pending); err != nil {
			return written, fmt.Errorf("write output: %w", err)
		}
		c.pending = c.pending[:0]
		c.h.Reset()
	}
	return written, nil
}
