package cowstore

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"slices"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// This file holds what the crash tests (crashpoint_test.go,
// writeback_test.go) share: a workload of writes, resizes and flushes
// that touches every kind of metadata change (new L2 tables, new slots,
// new bits in old slots, in-place overwrites, shrink + grow that clear
// bits, writes past the end), a model of the image after every step, and
// the check a crashed and reloaded session must pass.

// genRemote is a remote image of any size whose bytes follow
// testutil.GenByte, generated on demand (so that an image can span
// several L2 tables without memory).
type genRemote struct{ size int64 }

func (g genRemote) ReadAt(p []byte, off int64) (int, error) {
	if off >= g.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), g.size-off))
	for i := range p[:n] {
		p[i] = testutil.GenByte(off + int64(i))
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (g genRemote) Size() int64 { return g.size }

// crashImageSize spans L2 table 0 and part of table 1, unaligned.
const crashImageSize = cowformat.L2Span + 3*cowformat.ClusterSize + 777

type stepKind int

const (
	stepWrite stepKind = iota
	stepResize
	stepFlush
)

// crashStep is one operation of the workload.
type crashStep struct {
	kind stepKind
	off  int64  // write
	data []byte // write
	size int64  // resize
}

func (s crashStep) String() string {
	switch s.kind {
	case stepWrite:
		return fmt.Sprintf("write %d+%d", s.off, len(s.data))
	case stepResize:
		return fmt.Sprintf("resize %d", s.size)
	}
	return "flush"
}

// pattern returns n bytes that differ from the generator's and from
// every other tag's, position by position.
func pattern(tag byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = tag ^ byte(i*13+i>>8)
	}
	return p
}

// crashWorkload is the deterministic workload of the crash tests.
func crashWorkload() []crashStep {
	w := func(off int64, n int, tag byte) crashStep {
		return crashStep{kind: stepWrite, off: off, data: pattern(tag, n)}
	}
	resize := func(n int64) crashStep { return crashStep{kind: stepResize, size: n} }
	flush := crashStep{kind: stepFlush}
	return []crashStep{
		// new table 0, new slots, aligned and read-modify-write blocks
		w(0, 3*cowformat.BlockSize, 1),
		w(5*cowformat.ClusterSize+100, 5000, 2),
		flush,
		// in-place overwrites (twice in one block), a new bit in an old
		// slot, a new table 1 with a new slot
		w(cowformat.BlockSize, cowformat.BlockSize, 3),
		w(cowformat.BlockSize+10, 20, 4),
		w(10*cowformat.BlockSize, cowformat.BlockSize, 5),
		w(cowformat.L2Span+2*cowformat.ClusterSize+50, 9000, 6),
		flush,
		// shrink inside the block just written (commits), grow again (clears
		// bits, zeroes the tail of that block), a new table 2
		resize(cowformat.L2Span + 2*cowformat.ClusterSize + 3000),
		resize(2*cowformat.L2Span + 5*cowformat.ClusterSize),
		w(2*cowformat.L2Span+cowformat.ClusterSize, 2*cowformat.BlockSize, 7),
		flush,
		// a write past the end (grows across a gap), an overwrite
		w(2*cowformat.L2Span+8*cowformat.ClusterSize+7, 100, 8),
		w(5*cowformat.ClusterSize+200, cowformat.BlockSize, 9),
		flush,
		// shrink below tables 1 and 2, write across the end, grow back over
		// table 1 (whose blocks must read as zeros), a partial block
		resize(6*cowformat.ClusterSize + 5),
		w(6*cowformat.ClusterSize, 2*cowformat.BlockSize, 10),
		resize(cowformat.L2Span + 2*cowformat.ClusterSize + 2*cowformat.BlockSize),
		w(3*cowformat.BlockSize+1, 10, 11),
		flush,
		// a write across a cluster boundary into a new slot
		w(8*cowformat.ClusterSize-30*cowformat.BlockSize, 64<<10, 12),
		flush,
	}
}

// crashModel is the image as the workload leaves it after some step: a
// sparse map of written blocks over the remote image.
type crashModel struct {
	size, valid int64
	remote      genRemote
	blocks      map[int64][]byte // block index -> BlockSize bytes, immutable
}

func newCrashModel(r genRemote) *crashModel {
	return &crashModel{size: r.size, valid: r.size, remote: r, blocks: map[int64][]byte{}}
}

func (m *crashModel) clone() *crashModel {
	c := *m
	c.blocks = maps.Clone(m.blocks)
	return &c
}

// block returns a copy of block b: written bytes, else the remote image
// below valid, else zeros.
func (m *crashModel) block(b int64) []byte {
	if p, ok := m.blocks[b]; ok {
		return bytes.Clone(p)
	}
	p := make([]byte, cowformat.BlockSize)
	start := b * cowformat.BlockSize
	if n := min(m.valid-start, cowformat.BlockSize); n > 0 {
		m.remote.ReadAt(p[:n], start)
	}
	return p
}

func (m *crashModel) resize(n int64) {
	if n >= m.size {
		m.size = n
		return
	}
	m.valid = min(m.valid, n)
	for b := range m.blocks {
		if b*cowformat.BlockSize >= n {
			delete(m.blocks, b)
		}
	}
	if n%cowformat.BlockSize != 0 {
		p := m.block(n / cowformat.BlockSize)
		clear(p[n%cowformat.BlockSize:])
		m.blocks[n/cowformat.BlockSize] = p
	}
	m.size = n
}

func (m *crashModel) write(p []byte, off int64) {
	if end := off + int64(len(p)); end > m.size {
		m.resize(end)
	}
	for pos := 0; pos < len(p); {
		b := (off + int64(pos)) / cowformat.BlockSize
		in := int((off + int64(pos)) % cowformat.BlockSize)
		blk := m.block(b)
		n := copy(blk[in:], p[pos:])
		m.blocks[b] = blk
		pos += n
	}
}

// apply runs step s on the model and reports whether the overlay commits
// in it (a flush, or a shrink: Resize commits a shrink before it
// returns).
func (m *crashModel) apply(s crashStep) (commits bool) {
	switch s.kind {
	case stepWrite:
		m.write(s.data, s.off)
	case stepResize:
		commits = s.size < m.size
		m.resize(s.size)
	default:
		commits = true
	}
	return commits
}

// crashStates returns the model after every step (states[0] is the
// remote image, states[i+1] the image after step i) and, for every
// step, whether it commits.
func crashStates(steps []crashStep) (states []*crashModel, commits []bool) {
	m := newCrashModel(genRemote{crashImageSize})
	states = []*crashModel{m.clone()}
	for _, s := range steps {
		commits = append(commits, m.apply(s))
		states = append(states, m.clone())
	}
	return states, commits
}

// runStep applies a step to the overlay.
func runStep(o *Overlay, s crashStep) error {
	switch s.kind {
	case stepWrite:
		_, err := o.WriteAt(s.data, s.off)
		return err
	case stepResize:
		return o.Resize(s.size)
	}
	return o.Flush()
}

// allowedStates returns the range of states a session may show after a
// crash: from the last acknowledged one (state index acked) up to the
// state of the next commit (the one that may have been under way).
func allowedStates(commits []bool, acked int) (from, to int) {
	to = len(commits)
	for i := acked; i < len(commits); i++ {
		if commits[i] {
			to = i + 1
			break
		}
	}
	return acked, to
}

// checkBlocks returns the blocks worth reading back: every block any
// state wrote, its neighbours, the blocks at every size boundary, and
// every 16th block of each cluster written to.
func checkBlocks(states []*crashModel) []int64 {
	set := map[int64]bool{}
	for _, s := range states {
		for b := range s.blocks {
			set[b-1], set[b], set[b+1] = true, true, true
			c := b * cowformat.BlockSize / cowformat.ClusterSize
			for i := int64(0); i < cowformat.ClusterBlocks; i += 16 {
				set[c*cowformat.ClusterBlocks+i] = true
			}
		}
		set[(s.size-1)/cowformat.BlockSize], set[s.size/cowformat.BlockSize] = true, true
	}
	delete(set, -1)
	return slices.Sorted(maps.Keys(set))
}

// checkCrashed verifies a reloaded session against states[from..to]: its
// size is one of theirs, and every block reads as that block in one of
// them (a block a state does not reach entirely does not count for it).
func checkCrashed(o *Overlay, states []*crashModel, from, to int, blocks []int64) error {
	size := o.Size()
	okSize := false
	for _, s := range states[from : to+1] {
		okSize = okSize || s.size == size
	}
	if !okSize {
		return fmt.Errorf("size %d is not the size of states %d..%d", size, from, to)
	}
	got := make([]byte, cowformat.BlockSize)
	for _, b := range blocks {
		start := b * cowformat.BlockSize
		if start >= size {
			continue
		}
		end := min(start+cowformat.BlockSize, size)
		n := int(end - start)
		if _, err := o.ReadAt(got[:n], start); err != nil && err != io.EOF {
			return fmt.Errorf("read block %d: %v", b, err)
		}
		match := -1
		for j := from; j <= to && match < 0; j++ {
			if states[j].size >= end && bytes.Equal(got[:n], states[j].block(b)[:n]) {
				match = j
			}
		}
		if match < 0 {
			return fmt.Errorf("block %d (offset %d, cluster %d) reads %x..., which none of states %d..%d had (state %d: %x...)",
				b, start, start/cowformat.ClusterSize, got[:8], from, to, from, states[from].block(b)[:8])
		}
	}
	return nil
}

// checkContinue writes to a reloaded session where the crash may have
// left ignored tables and slots behind (a new cluster, a block of table
// 1, an old block), flushes, reloads and checks that exactly those
// blocks changed: the slots and tables Load ignored are reused safely.
func checkContinue(t *testing.T, dir string, opts Options, o *Overlay, blocks []int64) {
	t.Helper()
	size := o.Size()
	snap := map[int64][]byte{}
	for _, b := range blocks {
		if b*cowformat.BlockSize+cowformat.BlockSize <= size {
			p := make([]byte, cowformat.BlockSize)
			o.ReadAt(p, b*cowformat.BlockSize)
			snap[b] = p
		}
	}
	writes := map[int64][]byte{3 * cowformat.ClusterBlocks: pattern(100, cowformat.BlockSize), (cowformat.L2Span + cowformat.ClusterSize + cowformat.BlockSize) / cowformat.BlockSize: pattern(101, cowformat.BlockSize), 1: pattern(102, cowformat.BlockSize)}
	for b, p := range writes {
		if _, err := o.WriteAt(p, b*cowformat.BlockSize); err != nil {
			t.Fatalf("write after reload: %v", err)
		}
		snap[b] = p
	}
	if err := o.Flush(); err != nil {
		t.Fatalf("flush after reload: %v", err)
	}
	if err := o.Close(); err != nil {
		t.Fatalf("close after reload: %v", err)
	}
	o2, err := Load(dir, opts)
	if err != nil {
		t.Fatalf("second load: %v", err)
	}
	defer o2.Close()
	got := make([]byte, cowformat.BlockSize)
	for b, want := range snap {
		o2.ReadAt(got, b*cowformat.BlockSize)
		if !bytes.Equal(got, want) {
			t.Fatalf("after writing to the reloaded session, block %d changed: %x..., want %x...", b, got[:8], want[:8])
		}
	}
}
