package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"
)

// generateChunk is the write size of -c.
const generateChunk = 8 << 20

// generate is -c: it writes the test image, size bytes of 0x2A, in large
// writes and syncs it. An existing non-empty file (or any block device) is
// only overwritten with --force. A regular file left incomplete by an
// error or a signal is removed, so no half image looks like a test image.
type generate struct {
	ctx    context.Context
	e      *env
	path   string
	size   int64
	force  bool
	nbdCmd string
	out    io.Writer
}

func (g *generate) run() int {
	t, created, err := g.open()
	if err != nil {
		fmt.Fprintf(g.out, "generate %s: %v\n", g.path, err)
		return exitFailure
	}
	start := time.Now()
	err = g.write(t)
	if cerr := t.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close: %w", cerr)
	}
	if err != nil {
		fmt.Fprintf(g.out, "generate %s: FAILED: %v\n", g.path, err)
		if created {
			if rerr := os.Remove(g.path); rerr == nil {
				fmt.Fprintf(g.out, "generate %s: removed the incomplete file\n", g.path)
			}
		}
		return exitFailure
	}
	d := time.Since(start)
	fmt.Fprintf(g.out, "generate %s: OK: %d bytes of 0x%02x in %s (%.0f MB/s)\n",
		g.path, g.size, baseData, roundDuration(d), float64(g.size)/1e6/max(d.Seconds(), 1e-9))
	return exitOK
}

// open opens or creates the target. created is true for a regular file
// that this run (re)wrote from the start.
func (g *generate) open() (t target, created bool, err error) {
	fi, err := os.Stat(g.path)
	switch {
	case os.IsNotExist(err):
	case err != nil:
		return nil, false, err
	case g.e.isDevice(g.path, fi):
		if !g.force {
			return nil, false, fmt.Errorf("is a block device; use --force to overwrite its first %d bytes", g.size)
		}
		t, err := g.e.open(g.path, true, g.nbdCmd)
		if err != nil {
			return nil, false, err
		}
		if n, err := t.Size(); err != nil || n < g.size {
			t.Close()
			if err != nil {
				return nil, false, err
			}
			return nil, false, fmt.Errorf("the device has %d bytes, fewer than %d", n, g.size)
		}
		return t, false, nil
	case !fi.Mode().IsRegular():
		return nil, false, fmt.Errorf("exists and is not a regular file (%v)", fi.Mode().Type())
	case fi.Size() > 0 && !g.force:
		return nil, false, fmt.Errorf("exists and is not empty (%d bytes); use --force to overwrite it", fi.Size())
	}
	f, err := os.OpenFile(g.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, false, err
	}
	return &fileTarget{f: f}, true, nil
}

func (g *generate) write(t target) error {
	buf := filled(min(generateChunk, max(g.size, 1)), baseData)
	for off := int64(0); off < g.size; {
		if err := interrupted(g.ctx); err != nil {
			return err
		}
		n := min(int64(len(buf)), g.size-off)
		if err := writeFull(t, buf[:n], off); err != nil {
			return err
		}
		off += n
	}
	if err := t.Sync(); err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	return nil
}
