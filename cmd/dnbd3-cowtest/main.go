// Command dnbd3-cowtest tests a copy-on-write image with the modes and
// flags of the reference's dnbd3-fuse-cow-test (spec/cowtest.md):
//
//	dnbd3-cowtest -c FILE [SIZE]          write the 0x2A test image
//	dnbd3-cowtest -t FILE [-d SEC]        standard test (8 sub-tests)
//	dnbd3-cowtest -v FILE                 verify after a standard test
//	dnbd3-cowtest -r MOUNTED NORMAL       random test, then compare
//	dnbd3-cowtest -x A B                  compare
//	dnbd3-cowtest -w A B                  fixed replay, then compare
//
// FILE may be a regular file (a FUSE mount's image) or a block device
// (/dev/nbdN attached by "dnbd3-nbd attach -c"); on a device, sizes come
// from BLKGETSIZE64 and resizes run "dnbd3-nbd resize DEVICE SIZE" (see
// deviceTarget). Exit codes: 0 passed (skipped steps are shown but are not
// failures), 1 failed, 2 bad usage.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	// The first SIGINT/SIGTERM ends the current test (for -r: the random
	// phase, after which the compare runs); a second one aborts the compare.
	soft, cancelSoft := context.WithCancel(context.Background())
	hard, cancelHard := context.WithCancel(context.Background())
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		cancelSoft()
		<-sig
		cancelHard()
	}()
	e := &env{
		stdout:     os.Stdout,
		stderr:     os.Stderr,
		final:      hard,
		isDevice:   isBlockDevice,
		openDevice: openBlockDevice,
		progress:   10 * time.Second,
	}
	code := run(soft, os.Args[1:], e)
	cancelSoft()
	cancelHard()
	os.Exit(code)
}
