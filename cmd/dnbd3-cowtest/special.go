package main

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// specialOp is one operation of the -w replay: a write of size bytes at
// off, or (size 0) a truncate to off.
type specialOp struct {
	off, size int64
}

// specialOps is the reference's fixed replay (spec/cowtest.md §6): it
// shrinks below written data, writes past the end and truncates unaligned.
var specialOps = []specialOp{
	{976314368, 569344},
	{970432512, 1253376},
	{959447040, 692224},
	{782128012, 0},
	{945591351, 0},
	{956534784, 344064},
	{966615040, 397312},
	{906517288, 0},
	{2062985199, 0},
	{966663420, 1097920},
	{969617408, 327680},
	{957513728, 1105920},
	{964941207, 1183680},
	{958701568, 741376},
	{958701568, 102400},
	{970027008, 20480},
}

// specialTest is -w: the fixed replay on both targets, then a compare. The
// data of the writes comes from the seeded generator. A write that ends
// past a device's end (a regular file would grow) first resizes both
// targets to the write's end, which is what the write does to a file.
type specialTest struct {
	ctx  context.Context
	a, b target
	seed uint64
	out  io.Writer

	order    []target // resize order: devices first
	truncOff error    // resizing is unavailable
}

func (s *specialTest) run() int {
	_, data := seededGenerators(s.seed)
	s.order = resizeOrder(s.a, s.b)
	fmt.Fprintf(s.out, "special test: %s and %s, %d operations, data seed %d\n", s.a.Name(), s.b.Name(), len(specialOps), s.seed)
	rep := newReporter(s.out)
	for i, op := range specialOps {
		if op.size == 0 {
			name := fmt.Sprintf("op %2d truncate", i+1)
			if s.truncOff != nil {
				rep.skipped(name, label(fmt.Sprintf("to %d", op.off)), s.truncOff)
				continue
			}
			if !rep.step(name, label(fmt.Sprintf("to %d", op.off)), func() error { return s.resize(op.off) }) {
				rep.notRun = len(specialOps) - i - 1
				break
			}
			continue
		}
		name := fmt.Sprintf("op %2d write", i+1)
		buf := make([]byte, op.size)
		data.Read(buf)
		if !rep.step(name, span{op.off, op.off + op.size}, func() error { return s.write(buf, op.off) }) {
			rep.notRun = len(specialOps) - i - 1
			break
		}
	}
	if rep.failed == 0 {
		compareTargets(s.ctx, rep, s.a, s.b)
	}
	return rep.finish("special test")
}

// resize resizes both targets, devices first. If the first one cannot be
// resized at all, the truncates are skipped on both.
func (s *specialTest) resize(n int64) error {
	for i, t := range s.order {
		if err := t.Resize(s.ctx, n); err != nil {
			var unavailable *resizeUnavailableError
			if i == 0 && errors.As(err, &unavailable) {
				s.truncOff = unavailable
			}
			return err
		}
	}
	return nil
}

// write writes buf at off to both targets, growing a device first when the
// write ends past its end.
func (s *specialTest) write(buf []byte, off int64) error {
	end := off + int64(len(buf))
	for _, t := range s.order {
		if !t.IsDevice() {
			continue
		}
		size, err := t.Size()
		if err != nil {
			return err
		}
		if end > size {
			if err := s.resize(end); err != nil {
				return fmt.Errorf("grow to %d for a write past the end: %w", end, err)
			}
			break
		}
	}
	for _, t := range []target{s.a, s.b} {
		if err := writeFull(t, buf, off); err != nil {
			return err
		}
	}
	return nil
}
