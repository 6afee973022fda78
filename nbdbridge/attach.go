package nbdbridge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of AttachOptions.
const (
	DefaultBlockSize       = 512
	DefaultTimeout         = 70 * time.Second
	DefaultDeadConnTimeout = 120 * time.Second
	// DefaultDirectTimeout is AttachOptions.DirectTimeout's default.
	DefaultDirectTimeout = 500 * time.Millisecond
	// DefaultMaxRequestKB is AttachOptions.MaxRequestKB's default: 1 MiB,
	// the client's GET_BLOCK size and well below a proxy's maxPayload
	// (9 MB), which bounds the reads a proxy relays for a direct slot.
	// Larger requests measured no faster.
	DefaultMaxRequestKB = 1024
)

// AttachOptions configure Attach.
type AttachOptions struct {
	// Backend is the storage the device shows.
	Backend Backend
	// Device is the device index to use, or -1 to take over an orphaned
	// device with the same BackendID or else let the kernel pick a free one.
	Device int
	// Connections is the number of socketpairs (default min(4, CPUs)).
	Connections int
	// BlockSize is the logical block size (512 default, or 4096).
	BlockSize uint64
	// Timeout is the kernel's per-request timeout. Keep it above the
	// backend's own deadline so the backend answers EIO first.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds requests when every
	// connection is dead, waiting for a (restarted) daemon to RECONFIGURE.
	DeadConnTimeout time.Duration
	// BackendID identifies what the device serves (in sysfs "backend"); a
	// restarted daemon finds its device by it.
	BackendID string
	// Info is recorded in the state file for `list` (image, rid, ...).
	Info map[string]string
	// Workers bounds the requests the backend serves at once (see
	// EngineOptions.Workers); remote backends want more than the default.
	Workers int
	// ReadAheadKB is the device's read-ahead (default
	// DefaultReadAheadKB; negative leaves the kernel's 128 KiB).
	ReadAheadKB int
	// MaxRequestKB is the largest request the block layer builds
	// (max_sectors_kb, clamped to what the queue allows, 32 MiB): 0 means
	// DefaultMaxRequestKB, up from the driver's 128 KiB, so large reads
	// become fewer requests; negative leaves it.
	MaxRequestKB int
	// Direct, if set, supplies connections for the kernel-direct path
	// (read-only devices): the kernel then reads from the server itself
	// and the relay slots only serve while no server offers it.
	Direct DirectDialer
	// DirectTimeout is the kernel's request timeout while every slot is
	// direct: how long a request in flight on a dead server's socket waits
	// before the kernel re-sends it on a replacement (default
	// DefaultDirectTimeout; below a second through the block layer's
	// io_timeout). It follows the device's read latency and doubles, up
	// to 32 s, while a server that still answers lets requests outlast it.
	DirectTimeout time.Duration
	// Logger receives the lifecycle logs.
	Logger *slog.Logger
}

// Device is a kernel NBD device served by this process.
type Device struct {
	Index    int
	Path     string
	TookOver bool // an orphaned device was taken over with RECONFIGURE

	opts   AttachOptions
	engine *Engine
	lock   *DeviceLock
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	sysfs     Sysfs         // the real one; tests point it elsewhere
	events    chan ctlEvent // to the control loop
	detaching atomic.Bool   // Shutdown is disconnecting the device

	// owned by the control loop (and offer before it starts)
	directRetryAt time.Time
	curTimeout    time.Duration // the timeout last sent to the kernel

	mu            sync.Mutex
	directTimeout time.Duration         // the request timeout while every slot is direct
	conns         map[net.Conn]struct{} // relay connections being served
	slots         []*slot
	untracked     int    // kernel slots of a previous daemon we have no handle on
	replaced      uint64 // slots replaced since the start
	discCh        chan struct{}
	discSet       bool
}

// Attach makes opts.Backend available as a kernel NBD device and serves it
// until Shutdown or until someone disconnects the device. It returns once
// the device is usable: its size is visible and partitions are scanned.
func Attach(ctx context.Context, opts AttachOptions) (*Device, error) {
	if opts.Connections <= 0 {
		opts.Connections = min(4, runtime.NumCPU())
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = DefaultBlockSize
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.DeadConnTimeout == 0 {
		opts.DeadConnTimeout = DefaultDeadConnTimeout
	}
	if opts.DirectTimeout <= 0 {
		opts.DirectTimeout = DefaultDirectTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := Available(); err != nil {
		return nil, err
	}
	// The device's size is a multiple of the block size; a copy-on-write
	// image may have any size, its last partial block is not visible.
	size := opts.Backend.Size()
	size -= size % int64(opts.BlockSize)
	if size <= 0 {
		return nil, fmt.Errorf("nbdbridge: export size %d is smaller than one block of %d bytes", opts.Backend.Size(), opts.BlockSize)
	}
	d := &Device{
		opts:   opts,
		engine: NewEngine(opts.Backend, EngineOptions{Logger: opts.Logger, Workers: opts.Workers}),
		log:    opts.Logger,
		conns:  map[net.Conn]struct{}{},
		discCh: make(chan struct{}),
		events: make(chan ctlEvent, 64),

		directTimeout: opts.DirectTimeout,
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	ok := false
	defer func() {
		if !ok {
			d.stop(false)
		}
	}()

	index, err := d.takeOver(size)
	if err != nil {
		return nil, err
	}
	if index < 0 {
		if index, err = d.connect(size); err != nil {
			return nil, err
		}
	}
	d.Index, d.Path = index, DevicePath(index)
	if err := WaitReady(ctx, index, size); err != nil {
		if !d.TookOver {
			Disconnect(index)
		}
		return nil, fmt.Errorf("%s did not become ready: %w", d.Path, err)
	}
	d.tuneQueue()
	st := State{Index: index, Device: d.Path, PID: os.Getpid(), BackendID: opts.BackendID, Size: size,
		BlockSize: opts.BlockSize, Connections: opts.Connections, ReadOnly: IsReadOnly(opts.Backend),
		Started: time.Now().UTC(), Info: opts.Info}
	if err := WriteState(st); err != nil {
		d.log.Warn("cannot write state file", "err", err)
	}
	d.wg.Add(2)
	go d.watchLinkDead()
	go d.control()
	ok = true
	return d, nil
}

// tuneQueue applies the read-ahead and request size options; a failure
// only costs speed and is logged.
func (d *Device) tuneQueue() {
	q := QueueSettings{ReadAheadKB: d.opts.ReadAheadKB, MaxSectorsKB: d.opts.MaxRequestKB}
	switch {
	case q.ReadAheadKB == 0:
		q.ReadAheadKB = DefaultReadAheadKB
	case q.ReadAheadKB < 0:
		q.ReadAheadKB = 0
	}
	switch {
	case q.MaxSectorsKB == 0:
		q.MaxSectorsKB = DefaultMaxRequestKB
	case q.MaxSectorsKB < 0:
		q.MaxSectorsKB = 0
	}
	got, err := TuneQueue(d.Index, q)
	if err != nil {
		d.log.Warn("cannot tune the device's queue", "device", d.Path, "err", err)
		return
	}
	d.log.Debug("queue", "device", d.Path, "readAheadKB", got.ReadAheadKB, "maxRequestKB", got.MaxSectorsKB)
}

// takeOver looks for a device whose daemon died and RECONFIGUREs it with
// fresh sockets. It returns -1 if there is none to take over.
func (d *Device) takeOver(size int64) (int, error) {
	o := d.opts
	var candidates []int
	if o.Device >= 0 {
		candidates = []int{o.Device}
	} else if o.BackendID != "" {
		found, err := FindByBackend(o.BackendID)
		if err != nil {
			d.log.Debug("cannot search devices by backend", "err", err)
		}
		candidates = found
	}
	for _, idx := range candidates {
		connected, err := isConnected(idx)
		if err != nil {
			return -1, err
		}
		if !connected {
			continue // a free device: connect() uses it
		}
		id, _ := DeviceBackend(idx)
		if id != o.BackendID || o.BackendID == "" {
			if o.Device >= 0 {
				return -1, fmt.Errorf("nbdbridge: %s is already in use by another backend (%q)", DevicePath(idx), id)
			}
			continue
		}
		lock, free, err := TryLockDevice(idx)
		if err != nil {
			return -1, err
		}
		if !free {
			if o.Device >= 0 {
				return -1, fmt.Errorf("nbdbridge: %s is served by another running dnbd3-nbd", DevicePath(idx))
			}
			continue
		}
		if got, _ := DeviceSize(idx); got != size {
			lock.Unlock()
			return -1, fmt.Errorf("nbdbridge: %s was attached with %d bytes but the image now has %d; detach it first", DevicePath(idx), got, size)
		}
		n := o.Connections
		if st, err := ReadState(idx); err == nil && st.Connections > 0 {
			n = st.Connections
		}
		d.lock = lock
		d.Index = idx
		d.opts.Connections = n
		// Slots the previous daemon left alive (direct sockets keep
		// working without it) drop our sockets: they stay untracked until
		// a LINK_DEAD shows one of them died.
		got, _, err := d.offer(n, false, 0)
		if err != nil {
			return -1, fmt.Errorf("take over %s: %w", DevicePath(idx), err)
		}
		d.untracked = n - got
		d.TookOver = true
		d.log.Info("took over orphaned device with RECONFIGURE", "device", DevicePath(idx), "connections", n,
			"replaced", got, "mode", d.SlotStatus().Mode)
		return idx, nil
	}
	return -1, nil
}

// connect sends a netlink CONNECT for a new device.
func (d *Device) connect(size int64) (int, error) {
	o := d.opts
	_, idx, err := d.offer(o.Connections, true, size)
	if err != nil {
		return -1, err
	}
	lock, free, err := TryLockDevice(idx)
	if err != nil || !free {
		Disconnect(idx)
		if err == nil {
			err = errors.New("nbdbridge: held by another process")
		}
		return -1, fmt.Errorf("lock %s: %w", DevicePath(idx), err)
	}
	d.lock = lock
	d.Index = idx
	st := d.SlotStatus()
	d.log.Info("connected", "device", DevicePath(idx), "size", size, "connections", o.Connections,
		"blockSize", o.BlockSize, "flags", FormatFlags(d.engine.Flags()), "mode", st.Mode, "server", st.DirectServer)
	return idx, nil
}

func (d *Device) track(c net.Conn, add bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if add {
		d.conns[c] = struct{}{}
	} else {
		delete(d.conns, c)
	}
}

func (d *Device) closeConns() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for c := range d.conns {
		c.Close()
	}
}

// Disconnected is closed when every connection has ended for good: the
// kernel disconnected the device (e.g. `dnbd3-nbd detach`), or the slots
// gave up or were stopped.
func (d *Device) Disconnected() <-chan struct{} { return d.discCh }

// Engine returns the transmission engine (for statistics).
func (d *Device) Engine() *Engine { return d.engine }

// Shutdown ends serving. The backend is flushed first. If the device is
// not in use (or force is set) it is disconnected and its state removed;
// otherwise it is left attached so that a successor can RECONFIGURE it
// within the dead-connection timeout. It reports whether it disconnected.
func (d *Device) Shutdown(force bool) (disconnected bool, err error) {
	if ferr := d.opts.Backend.Flush(); ferr != nil {
		err = fmt.Errorf("flush: %w", ferr)
	}
	inUse := false
	select {
	case <-d.discCh:
		force = true // already disconnected by someone else: nothing to probe
	case <-d.ctx.Done():
		force = true // stopped: nothing serves it any more
	default:
		var uerr error
		if inUse, uerr = InUse(d.Index); uerr != nil {
			d.log.Warn("cannot tell whether the device is in use; treating it as in use", "device", d.Path, "err", uerr)
			inUse = true
		}
	}
	if !inUse || force {
		d.detaching.Store(true)
		if derr := Disconnect(d.Index); derr != nil && !errors.Is(derr, ErrNotConnected) {
			d.log.Warn("disconnect failed", "device", d.Path, "err", derr)
		}
		if !d.waitDisconnected(10 * time.Second) {
			d.log.Warn("kernel did not end every connection within 10 s", "device", d.Path)
		}
		d.stop(true)
		d.log.Info("detached", "device", d.Path)
		return true, err
	}
	if st := d.SlotStatus(); st.Relay == 0 && st.Direct > 0 {
		d.log.Warn(fmt.Sprintf("%s is in use (mounted or open): leaving it attached; the kernel keeps reading from %s directly, but nothing replaces a failed server until dnbd3-nbd attach is restarted to take it over",
			d.Path, st.DirectServer), "device", d.Path)
	} else {
		d.log.Warn(fmt.Sprintf("%s is in use (mounted or open): leaving it attached; restart dnbd3-nbd attach within %v to take it over, or I/O on it fails",
			d.Path, d.opts.DeadConnTimeout), "device", d.Path)
	}
	d.stop(false)
	return false, err
}

// waitDisconnected waits until the control loop saw every slot end or
// the kernel reports the device disconnected.
func (d *Device) waitDisconnected(limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-d.discCh:
			return true
		case <-time.After(50 * time.Millisecond):
		}
		if !connectedOrUnknown(d.Index) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// stop ends every slot and waits for them, removes the state files if
// asked to (while still holding the lock, so they cannot be a successor's)
// and releases the device lock.
func (d *Device) stop(removeState bool) {
	d.cancel()
	d.closeConns()
	d.wg.Wait()
	d.mu.Lock()
	for _, s := range d.slots {
		if s.direct {
			unix.Close(s.fd) // the kernel keeps its own reference
		}
	}
	d.slots = nil
	d.mu.Unlock()
	if removeState {
		RemoveState(d.Index)
	}
	d.lock.Unlock()
}

// watchLinkDead passes the kernel's LINK_DEAD events for this device to
// the control loop.
func (d *Device) watchLinkDead() {
	defer d.wg.Done()
	ch, err := WatchLinkDead(d.ctx)
	if err != nil {
		d.log.Warn("cannot watch link-dead events; dead connections are found by polling", "err", err)
		return
	}
	for idx := range ch {
		if idx != d.Index {
			continue
		}
		d.log.Info("kernel reports a dead connection", "device", d.Path)
		select {
		case d.events <- ctlEvent{linkDead: true}:
		case <-d.ctx.Done():
			return
		}
	}
}

// socketPair returns our end as a net.Conn and the kernel's end as an fd.
func socketPair() (net.Conn, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-socketpair")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("socketpair: %w", err)
	}
	return conn, fds[1], nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func isConnected(idx int) (bool, error) {
	st, err := Status(idx)
	if err != nil {
		return false, err
	}
	for _, s := range st {
		if s.Index == idx {
			return s.Connected, nil
		}
	}
	return false, nil
}

// Resize changes the size of a resizable backend and then the device's
// size (netlink RECONFIGURE with SIZE_BYTES). The device gets the new size
// rounded down to the block size, which it must be a multiple of. It
// returns the device's new size.
func (d *Device) Resize(size int64) (int64, error) {
	r, ok := d.opts.Backend.(Resizer)
	if !ok {
		return 0, errors.New("nbdbridge: this device cannot be resized (only copy-on-write devices can)")
	}
	devSize := size - size%int64(d.opts.BlockSize)
	if devSize <= 0 {
		return 0, fmt.Errorf("nbdbridge: size %d is smaller than one block (%d bytes)", size, d.opts.BlockSize)
	}
	if err := r.Resize(size); err != nil {
		return 0, err
	}
	if err := Reconfigure(d.Index, ReconfigureOptions{BackendID: d.opts.BackendID, SizeBytes: uint64(devSize)}); err != nil {
		return 0, fmt.Errorf("the image was resized to %d bytes, but the device was not: %w", size, err)
	}
	if st, err := ReadState(d.Index); err == nil {
		st.Size = devSize
		WriteState(st)
	}
	d.log.Info("resized", "device", d.Path, "size", size, "deviceSize", devSize)
	return devSize, nil
}
