package main

import (
	"context"
	"fmt"
)

// compareTargets compares a and b as the reference's compare does (sizes,
// then the contents in 1,310,720-byte chunks, printing the first
// difference), with the results as two steps of rep.
//
// Sizes: two regular files must have the same size. A device shows its COW
// session's size rounded down to its logical block size, so sizes are
// equal when they agree in units of the larger block size of the two (for
// two files: exactly). If the sizes differ and one side is a device that
// cannot be resized, the size check is skipped (the harness could not have
// made them equal). The contents are compared up to the smaller size.
func compareTargets(ctx context.Context, rep *reporter, a, b target) {
	sa, errA := a.Size()
	sb, errB := b.Size()
	common := min(sa, sb)
	var note string
	rep.step("size", label(fmt.Sprintf("%d vs %d", sa, sb)), func() error {
		if errA != nil {
			return errA
		}
		if errB != nil {
			return errB
		}
		var err error
		note, err = checkSizes(ctx, a, b, sa, sb)
		return err
	})
	if note != "" {
		fmt.Fprintf(rep.w, "    size: %s\n", note)
	}
	if errA != nil || errB != nil {
		return
	}
	rep.step("content", span{0, common}, func() error {
		return compareContent(ctx, a, b, common)
	})
}

// checkSizes is the size step of compareTargets. The note explains sizes
// that differ but are not a failure.
func checkSizes(ctx context.Context, a, b target, sa, sb int64) (note string, err error) {
	bs := max(a.BlockSize(), b.BlockSize())
	if sa/bs == sb/bs {
		if sa == sb {
			return "", nil
		}
		long := a
		if sb > sa {
			long = b
		}
		return fmt.Sprintf("%s has %d bytes, %s has %d: equal in units of the device block size %d (the last %d bytes of %s are not visible through the device and are not compared)",
			a.Name(), sa, b.Name(), sb, bs, max(sa, sb)-min(sa, sb), long.Name()), nil
	}
	diff := fmt.Sprintf("%s has %d bytes, %s has %d", a.Name(), sa, b.Name(), sb)
	if bs > 1 {
		diff += fmt.Sprintf(" (in units of the device block size %d: %d vs %d blocks)", bs, sa/bs, sb/bs)
	}
	for _, t := range []target{a, b} {
		if t.IsDevice() {
			if err := t.CheckResize(ctx); err != nil {
				return "size difference not checked: " + diff, err
			}
		}
	}
	return "", fmt.Errorf("size difference: %s", diff)
}

// compareContent compares the first n bytes of a and b.
func compareContent(ctx context.Context, a, b target, n int64) error {
	ba := make([]byte, compareChunk)
	bb := make([]byte, compareChunk)
	for off := int64(0); off < n; {
		if err := interrupted(ctx); err != nil {
			return err
		}
		m := min(int64(compareChunk), n-off)
		if err := readFull(a, ba[:m], off); err != nil {
			return err
		}
		if err := readFull(b, bb[:m], off); err != nil {
			return err
		}
		if i := firstDiff(ba[:m], bb[:m]); i >= 0 {
			return fmt.Errorf("first difference at offset %d: %s has 0x%02x, %s has 0x%02x", off+int64(i), a.Name(), ba[i], b.Name(), bb[i])
		}
		off += m
	}
	return nil
}
