package nbdbridge

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Memory reclaim and the bridge daemon.
//
// The kernel writes the dirty pages of a writable /dev/nbdX back through the
// daemon that serves it. If the daemon needs memory to serve that write
// while memory is short, reclaim inside the daemon may wait for writeback to
// the very device the daemon has to serve: the machine stalls. nbd-client
// (in its swap mode) and userspace block servers defend against this; the
// daemon does the same, three ways:
//
//   - PR_SET_IO_FLUSHER (Linux 5.6) on every thread: its allocations never
//     start or wait for I/O (PF_MEMALLOC_NOIO), and dirty-page throttling
//     looks only at the device the daemon writes to itself
//     (PF_LOCAL_THROTTLE). The flag is per thread and inherited by the
//     threads a thread creates, and it survives execve; the Go runtime has
//     started threads before main runs, so ReexecAsIOFlusher sets it on
//     main's thread and re-executes the program: every thread of the new
//     process descends from a flagged one. It needs CAP_SYS_RESOURCE.
//   - mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): no page the daemon has
//     touched is ever swapped out or evicted. MCL_ONFAULT because the Go
//     runtime reserves read-write address space it never touches: without
//     MCL_ONFAULT it is all faulted in (an idle attach daemon measured
//     78 MB resident instead of 7-9 MB, 91 MB instead of 18-22 MB after a
//     96 MiB write). The kernel counts the whole address space (about
//     1.2 GiB of reservations) against RLIMIT_MEMLOCK, so with a finite
//     limit and without CAP_IPC_LOCK the runtime's next mapping would fail
//     and kill the daemon: then memory is not locked, with a warning.
//   - oom_score_adj (default -1000, what nbd-client sets in swap mode):
//     killing the daemon frees little and turns the device's dirty pages
//     into I/O errors, so the OOM killer picks other processes.

// ioFlusherReexecEnv marks the process image that ReexecAsIOFlusher
// started, so that it never re-executes twice.
const ioFlusherReexecEnv = "DNBD3GO_IO_FLUSHER_REEXEC"

// DefaultOOMScoreAdj is the oom_score_adj ProtectDaemon sets by default:
// the OOM killer never picks the daemon.
const DefaultOOMScoreAdj = -1000

// ReexecAsIOFlusher makes every thread of the process an I/O flusher
// (PR_SET_IO_FLUSHER). Call it first in main, before anything else: it
// sets the flag on the calling thread and re-executes /proc/self/exe with
// the same arguments and environment, so that it does not return on
// success. It returns nil without re-executing when the process already is
// an I/O flusher (the re-executed image, or one whose parent was), and
// otherwise the reason it could not be done; the process then runs on
// without the flag (ProtectDaemon reports it).
func ReexecAsIOFlusher() error {
	if os.Getenv(ioFlusherReexecEnv) != "" {
		os.Unsetenv(ioFlusherReexecEnv)
		return nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	on, err := ioFlusher()
	if err != nil || on {
		return err
	}
	if err := setIOFlusher(true); err != nil {
		return err
	}
	env := append(os.Environ(), ioFlusherReexecEnv+"=1")
	err = unix.Exec("/proc/self/exe", os.Args, env)
	return fmt.Errorf("re-executing /proc/self/exe as an I/O flusher: %w", err)
}

// ioFlusher reports whether the calling thread is an I/O flusher.
func ioFlusher() (bool, error) {
	v, err := unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0)
	if err != nil {
		return false, ioFlusherError(err)
	}
	return v == 1, nil
}

// setIOFlusher sets or clears PR_SET_IO_FLUSHER on the calling thread.
func setIOFlusher(on bool) error {
	arg := uintptr(0)
	if on {
		arg = 1
	}
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, arg, 0, 0, 0); err != nil {
		return ioFlusherError(err)
	}
	return nil
}

func ioFlusherError(err error) error {
	switch {
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE (run the daemon as root and keep that capability): %w", err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("PR_SET_IO_FLUSHER needs Linux 5.6 or newer: %w", err)
	}
	return fmt.Errorf("PR_SET_IO_FLUSHER: %w", err)
}

// IOFlusherThreads counts the threads of the process that are I/O flushers.
// /proc shows a thread's PF_* flags, whose numbering is the kernel's
// business, so the bits PR_SET_IO_FLUSHER sets are learnt by toggling it on
// the calling thread first (which ends in the state it had).
func IOFlusherThreads() (flagged, total int, err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	mask, err := ioFlusherMask()
	if err != nil {
		return 0, 0, err
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, 0, fmt.Errorf("listing threads: %w", err)
	}
	for _, t := range tasks {
		f, err := taskFlags("/proc/self/task/" + t.Name() + "/stat")
		if errors.Is(err, fs.ErrNotExist) {
			continue // the thread ended
		}
		if err != nil {
			return 0, 0, err
		}
		total++
		if f&mask == mask {
			flagged++
		}
	}
	return flagged, total, nil
}

// ioFlusherMask returns the PF_* bits PR_SET_IO_FLUSHER sets on this
// (locked) thread.
func ioFlusherMask() (uint64, error) {
	was, err := ioFlusher()
	if err != nil {
		return 0, err
	}
	defer setIOFlusher(was)
	if err := setIOFlusher(true); err != nil {
		return 0, err
	}
	on, err := taskFlags("/proc/thread-self/stat")
	if err != nil {
		return 0, err
	}
	if err := setIOFlusher(false); err != nil {
		return 0, err
	}
	off, err := taskFlags("/proc/thread-self/stat")
	if err != nil {
		return 0, err
	}
	if mask := on &^ off; mask != 0 {
		return mask, nil
	}
	return 0, errors.New("nbdbridge: PR_SET_IO_FLUSHER changes no flag that /proc shows; cannot check the threads")
}

// taskFlags returns the flags field (the 9th) of a /proc stat file.
func taskFlags(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := string(b)
	// The command name (field 2) is in parentheses and may hold anything.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("nbdbridge: %s: no command name", path)
	}
	fields := strings.Fields(s[i+1:])
	if len(fields) < 7 {
		return 0, fmt.Errorf("nbdbridge: %s: too few fields", path)
	}
	f, err := strconv.ParseUint(fields[6], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: flags: %w", path, err)
	}
	return f, nil
}

// LockMemory locks the daemon's memory with
// mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT) if the process may lock
// without limit (CAP_IPC_LOCK or RLIMIT_MEMLOCK unlimited); otherwise it
// leaves memory unlocked and says why.
func LockMemory() error {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err != nil {
		return fmt.Errorf("reading RLIMIT_MEMLOCK: %w", err)
	}
	if rl.Cur != unix.RLIM_INFINITY && !hasCapability(unix.CAP_IPC_LOCK) {
		return fmt.Errorf("RLIMIT_MEMLOCK is %d KiB and the process lacks CAP_IPC_LOCK; "+
			"the Go runtime's address-space reservations (over 1 GiB) would exceed it and make the daemon's own allocations fail. "+
			"Run it as root, or raise the limit (systemd: LimitMEMLOCK=infinity)", rl.Cur>>10)
	}
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		return fmt.Errorf("mlockall: %w (MCL_ONFAULT needs Linux 4.4)", err)
	}
	return nil
}

// hasCapability reports whether capability c is in the effective set.
func hasCapability(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil || c/32 >= len(data) {
		return false
	}
	return data[c/32].Effective&(1<<(uint(c)%32)) != 0
}

// SetOOMScoreAdj writes v to /proc/self/oom_score_adj.
func SetOOMScoreAdj(v int) error {
	f, err := os.OpenFile("/proc/self/oom_score_adj", os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(strconv.Itoa(v))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	switch {
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("setting oom_score_adj to %d: lowering it needs CAP_SYS_RESOURCE (or set OOMScoreAdjust= in the systemd unit): %w", v, err)
	case err != nil:
		return fmt.Errorf("setting oom_score_adj to %d: %w", v, err)
	}
	return nil
}

// Protection is what ProtectDaemon achieved. A nil error means that part
// of the protection is in place.
type Protection struct {
	IOFlusherThreads int   // threads with PR_SET_IO_FLUSHER
	Threads          int   // threads of the process
	IOFlusherErr     error // why not every thread is an I/O flusher
	MemoryLockErr    error // why memory is not locked
	OOMScoreAdjErr   error // why oom_score_adj could not be set
}

// ProtectDaemon protects a daemon that serves /dev/nbdX from deadlocking
// in memory reclaim: it checks that ReexecAsIOFlusher (called first in
// main) made every thread an I/O flusher, locks memory (LockMemory) and
// sets oom_score_adj. It logs what it achieved, and a warning for every
// part it could not do. A daemon without the protection still works; it
// may stall under memory pressure while the device has dirty pages.
func ProtectDaemon(log *slog.Logger, oomScoreAdj int) Protection {
	var p Protection
	flagged, total, err := IOFlusherThreads()
	p.IOFlusherThreads, p.Threads = flagged, total
	switch {
	case err != nil:
		p.IOFlusherErr = err
	case flagged < total:
		p.IOFlusherErr = fmt.Errorf("PR_SET_IO_FLUSHER is set on %d of %d threads: it must be set before the Go runtime starts "+
			"its threads, by ReexecAsIOFlusher at the start of main", flagged, total)
	}
	p.MemoryLockErr = LockMemory()
	p.OOMScoreAdjErr = SetOOMScoreAdj(oomScoreAdj)

	if p.IOFlusherErr != nil {
		log.Warn("the daemon is not an I/O flusher: under memory pressure, writeback to the device can stall the machine", "err", p.IOFlusherErr)
	}
	if p.MemoryLockErr != nil {
		log.Warn("memory not locked: the daemon's pages can be swapped out or evicted under memory pressure", "err", p.MemoryLockErr)
	}
	if p.OOMScoreAdjErr != nil {
		log.Warn("oom_score_adj not set: the OOM killer may pick the daemon and leave the device without it", "err", p.OOMScoreAdjErr)
	}
	if p.IOFlusherErr == nil && p.MemoryLockErr == nil && p.OOMScoreAdjErr == nil {
		log.Info("protected against memory-reclaim deadlocks", "ioFlusherThreads", flagged, "memoryLocked", true, "oomScoreAdj", oomScoreAdj)
	}
	return p
}
