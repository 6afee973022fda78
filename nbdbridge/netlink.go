package nbdbridge

// The kernel nbd driver's generic netlink control plane
// (include/uapi/linux/nbd-netlink.h): CONNECT hands already connected
// sockets to the kernel and creates /dev/nbdX, RECONFIGURE replaces dead
// sockets (or resizes), DISCONNECT tears a device down, STATUS lists
// devices, and the "nbd_mc_group" multicast group reports dead links.
//
// Every call here is a blocking syscall round trip to the kernel. Run them
// from a control goroutine, never from a goroutine that serves the
// device's I/O: the kernel may wait for outstanding requests while it
// handles them.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Generic netlink family "nbd".
const (
	nlFamilyName = "nbd"
	nlVersion    = 1
	nlMcastGroup = "nbd_mc_group"

	nlCmdConnect     = 1
	nlCmdDisconnect  = 2
	nlCmdReconfigure = 3
	nlCmdLinkDead    = 4
	nlCmdStatus      = 5

	nlAttrIndex           = 1 // u32
	nlAttrSizeBytes       = 2 // u64
	nlAttrBlockSize       = 3 // u64
	nlAttrTimeout         = 4 // u64 seconds
	nlAttrServerFlags     = 5 // u64
	nlAttrClientFlags     = 6 // u64
	nlAttrSockets         = 7 // nested SOCK_ITEM{SOCK_FD u32}
	nlAttrDeadConnTimeout = 8 // u64 seconds
	nlAttrDeviceList      = 9 // nested DEVICE_ITEM{DEVICE_INDEX u32, DEVICE_CONNECTED u8}
	nlAttrBackendID       = 10

	nlSockItem = 1
	nlSockFD   = 1

	nlDeviceItem      = 1
	nlDeviceIndex     = 1
	nlDeviceConnected = 2

	// Transmission flags the control plane itself needs to know about.
	nlServerFlagCanMultiConn = 1 << 8

	minBlockSize = 512
	maxBlockSize = 4096
)

// Client flags for ConnectOptions.ClientFlags (NBD_CFLAG_*).
const (
	// ClientFlagDestroyOnDisconnect removes the device node when it is
	// disconnected (useful for devices the kernel created on demand).
	ClientFlagDestroyOnDisconnect = 1 << 0
	// ClientFlagDisconnectOnClose disconnects the device when its last
	// opener closes it. Beware: any short-lived open (WaitReady, InUse,
	// blkid) then disconnects an otherwise unused device.
	ClientFlagDisconnectOnClose = 1 << 1
)

var (
	// ErrNoModule means the kernel has no nbd driver loaded.
	ErrNoModule = errors.New("nbdbridge: nbd kernel module not loaded: run `modprobe nbd`")
	// ErrNotRoot means the caller lacks CAP_SYS_ADMIN, which the kernel
	// requires for CONNECT, RECONFIGURE and DISCONNECT.
	ErrNotRoot = errors.New("nbdbridge: need root (CAP_SYS_ADMIN) to attach NBD devices")
	// ErrDeviceBusy means the requested device is already connected.
	ErrDeviceBusy = errors.New("nbdbridge: nbd device is already in use")
	// ErrNoDevice means the requested device index does not exist.
	ErrNoDevice = errors.New("nbdbridge: no such nbd device")
	// ErrNotConnected means the device exists but nothing is connected to it.
	ErrNotConnected = errors.New("nbdbridge: nbd device is not connected")
)

// ConnectOptions configure Connect (NBD_CMD_CONNECT).
type ConnectOptions struct {
	// Index is the device to use (/dev/nbdIndex), or -1 to let the kernel
	// pick a free device (or create one) atomically.
	Index int
	// SizeBytes is the device size; a positive multiple of BlockSize.
	SizeBytes uint64
	// BlockSize is the logical block size: a power of two from 512 to
	// 4096; 0 means 512.
	BlockSize uint64
	// ServerFlags are the NBD transmission flags of the export (READ_ONLY,
	// SEND_FLUSH, SEND_FUA, SEND_TRIM, CAN_MULTI_CONN, ...). More than one
	// socket requires CAN_MULTI_CONN.
	ServerFlags uint64
	// ClientFlags are ClientFlag* bits.
	ClientFlags uint64
	// Timeout is the kernel's per-request timeout, in whole seconds
	// (rounded up). On expiry the kernel marks the request's socket dead
	// (LINK_DEAD) and requeues the request. It is also how long a request
	// that was in flight on a socket that died waits before it is resent
	// on a replacement. 0 means the block layer's 30 s timer, on whose
	// expiry a single-socket device only warns and keeps waiting (but
	// resends requests of a replaced socket).
	Timeout time.Duration
	// DeadConnTimeout is how long requests wait for a RECONFIGURE when
	// every socket is dead before they fail with EIO; whole seconds,
	// rounded up. 0 fails them at once.
	DeadConnTimeout time.Duration
	// BackendID identifies the export; the kernel shows it in
	// /sys/block/nbdX/backend and requires it on RECONFIGURE. Optional.
	BackendID string
	// SocketFDs are connected stream sockets whose peers serve the NBD
	// transmission phase (no handshake). The kernel takes its own
	// references: the caller may close the fds once Connect returns.
	SocketFDs []int
}

// ReconfigureOptions configure Reconfigure (NBD_CMD_RECONFIGURE). Zero
// fields leave the device's setting unchanged.
type ReconfigureOptions struct {
	// BackendID must equal the identifier the device was connected with.
	BackendID string
	// SizeBytes resizes the device. Do not resize with requests in flight.
	SizeBytes uint64
	// BlockSize changes the logical block size.
	BlockSize uint64
	// Timeout sets the per-request timeout (whole seconds, rounded up).
	Timeout time.Duration
	// DeadConnTimeout sets the dead-connection timeout (whole seconds,
	// rounded up).
	DeadConnTimeout time.Duration
	// SocketFDs replace sockets the kernel has marked dead, one dead slot
	// per fd. The kernel silently ignores an fd when no slot is dead.
	SocketFDs []int
}

// DeviceStatus is one device of a Status reply.
type DeviceStatus struct {
	Index int
	// Connected is true while the device has a configuration (from
	// CONNECT until DISCONNECT completes), even if its sockets are dead.
	Connected bool
}

// kindError carries its own message and matches a sentinel error and the
// kernel's errno with errors.Is.
type kindError struct {
	msg  string
	errs []error
}

func (e *kindError) Error() string   { return e.msg }
func (e *kindError) Unwrap() []error { return e.errs }

func newKindError(kind, cause error, format string, args ...any) error {
	errs := []error{kind}
	if cause != nil {
		errs = append(errs, cause)
	}
	return &kindError{msg: fmt.Sprintf(format, args...), errs: errs}
}

// nlFamily is the resolved generic netlink family.
type nlFamily struct {
	id    uint16
	group uint32 // multicast group id of nbd_mc_group, 0 if absent
}

// lookupFamily resolves the "nbd" family. The lookup makes the kernel
// try to load the module (MODULE_ALIAS_GENL_FAMILY) where modprobe works.
func lookupFamily() (nlFamily, error) {
	f, err := netlink.GenlFamilyGet(nlFamilyName)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nlFamily{}, newKindError(ErrNoModule, err,
				"%v (the generic netlink family %q does not exist)", ErrNoModule, nlFamilyName)
		}
		return nlFamily{}, fmt.Errorf("look up generic netlink family %q: %w", nlFamilyName, err)
	}
	fam := nlFamily{id: f.ID}
	for _, g := range f.Groups {
		if g.Name == nlMcastGroup {
			fam.group = g.ID
		}
	}
	return fam, nil
}

// Available reports whether NBD devices can be attached: the nbd module is
// loaded (ErrNoModule otherwise) and the process has CAP_SYS_ADMIN
// (ErrNotRoot otherwise).
func Available() error {
	if _, err := lookupFamily(); err != nil {
		return err
	}
	ok, err := hasCapSysAdmin()
	if err != nil {
		return fmt.Errorf("read process capabilities: %w", err)
	}
	if !ok {
		return ErrNotRoot
	}
	return nil
}

func hasCapSysAdmin() (bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false, err
	}
	return data[unix.CAP_SYS_ADMIN/32].Effective&(1<<(unix.CAP_SYS_ADMIN%32)) != 0, nil
}

// seconds converts a timeout to the kernel's whole seconds, rounding up.
func seconds(name string, d time.Duration) (uint64, error) {
	if d < 0 {
		return 0, fmt.Errorf("nbdbridge: %s %v is negative", name, d)
	}
	return uint64((d + time.Second - 1) / time.Second), nil
}

func validBlockSize(bs uint64) error {
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return fmt.Errorf("nbdbridge: block size %d is invalid: use a power of two from %d to %d", bs, minBlockSize, maxBlockSize)
	}
	return nil
}

func socketsAttr(fds []int) (*nl.RtAttr, error) {
	socks := nl.NewRtAttr(nlAttrSockets|unix.NLA_F_NESTED, nil)
	for _, fd := range fds {
		if fd < 0 {
			return nil, fmt.Errorf("nbdbridge: invalid socket fd %d", fd)
		}
		item := socks.AddRtAttr(nlSockItem|unix.NLA_F_NESTED, nil)
		item.AddRtAttr(nlSockFD, nl.Uint32Attr(uint32(fd)))
	}
	return socks, nil
}

func backendAttr(id string) (*nl.RtAttr, error) {
	if strings.IndexByte(id, 0) >= 0 {
		return nil, fmt.Errorf("nbdbridge: backend identifier %q contains a NUL byte", id)
	}
	return nl.NewRtAttr(nlAttrBackendID, nl.ZeroTerminated(id)), nil
}

// connectAttrs validates opts and builds the CONNECT attributes.
func connectAttrs(opts ConnectOptions) ([]nl.NetlinkRequestData, error) {
	if opts.Index < -1 {
		return nil, fmt.Errorf("nbdbridge: device index %d is invalid: use -1 to let the kernel pick one", opts.Index)
	}
	bs := opts.BlockSize
	if bs == 0 {
		bs = minBlockSize
	}
	if err := validBlockSize(bs); err != nil {
		return nil, err
	}
	if opts.SizeBytes == 0 || opts.SizeBytes%bs != 0 {
		return nil, fmt.Errorf("nbdbridge: device size %d is not a positive multiple of the block size %d", opts.SizeBytes, bs)
	}
	if len(opts.SocketFDs) == 0 {
		return nil, errors.New("nbdbridge: connect needs at least one socket")
	}
	if len(opts.SocketFDs) > 1 && opts.ServerFlags&nlServerFlagCanMultiConn == 0 {
		return nil, fmt.Errorf("nbdbridge: %d sockets need the CAN_MULTI_CONN server flag (the kernel refuses more than one otherwise)", len(opts.SocketFDs))
	}
	timeout, err := seconds("timeout", opts.Timeout)
	if err != nil {
		return nil, err
	}
	dead, err := seconds("dead connection timeout", opts.DeadConnTimeout)
	if err != nil {
		return nil, err
	}
	var attrs []nl.NetlinkRequestData
	if opts.Index >= 0 {
		attrs = append(attrs, nl.NewRtAttr(nlAttrIndex, nl.Uint32Attr(uint32(opts.Index))))
	}
	attrs = append(attrs,
		nl.NewRtAttr(nlAttrSizeBytes, nl.Uint64Attr(opts.SizeBytes)),
		nl.NewRtAttr(nlAttrBlockSize, nl.Uint64Attr(bs)),
		nl.NewRtAttr(nlAttrServerFlags, nl.Uint64Attr(opts.ServerFlags)),
		nl.NewRtAttr(nlAttrClientFlags, nl.Uint64Attr(opts.ClientFlags)),
	)
	// Always sent: without it a reused device keeps the request timer of
	// its previous connection (observed on 6.1).
	attrs = append(attrs,
		nl.NewRtAttr(nlAttrTimeout, nl.Uint64Attr(timeout)),
		nl.NewRtAttr(nlAttrDeadConnTimeout, nl.Uint64Attr(dead)))
	if opts.BackendID != "" {
		a, err := backendAttr(opts.BackendID)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, a)
	}
	socks, err := socketsAttr(opts.SocketFDs)
	if err != nil {
		return nil, err
	}
	return append(attrs, socks), nil
}

// reconfigureAttrs validates opts and builds the RECONFIGURE attributes.
func reconfigureAttrs(index int, opts ReconfigureOptions) ([]nl.NetlinkRequestData, error) {
	if index < 0 {
		return nil, fmt.Errorf("nbdbridge: reconfigure needs a device index, got %d", index)
	}
	attrs := []nl.NetlinkRequestData{nl.NewRtAttr(nlAttrIndex, nl.Uint32Attr(uint32(index)))}
	if opts.BackendID != "" {
		a, err := backendAttr(opts.BackendID)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, a)
	}
	if opts.BlockSize != 0 {
		if err := validBlockSize(opts.BlockSize); err != nil {
			return nil, err
		}
		attrs = append(attrs, nl.NewRtAttr(nlAttrBlockSize, nl.Uint64Attr(opts.BlockSize)))
	}
	if opts.SizeBytes != 0 {
		if opts.BlockSize != 0 && opts.SizeBytes%opts.BlockSize != 0 {
			return nil, fmt.Errorf("nbdbridge: device size %d is not a multiple of the block size %d", opts.SizeBytes, opts.BlockSize)
		}
		attrs = append(attrs, nl.NewRtAttr(nlAttrSizeBytes, nl.Uint64Attr(opts.SizeBytes)))
	}
	timeout, err := seconds("timeout", opts.Timeout)
	if err != nil {
		return nil, err
	}
	if timeout > 0 {
		attrs = append(attrs, nl.NewRtAttr(nlAttrTimeout, nl.Uint64Attr(timeout)))
	}
	dead, err := seconds("dead connection timeout", opts.DeadConnTimeout)
	if err != nil {
		return nil, err
	}
	if dead > 0 {
		attrs = append(attrs, nl.NewRtAttr(nlAttrDeadConnTimeout, nl.Uint64Attr(dead)))
	}
	if len(opts.SocketFDs) > 0 {
		socks, err := socketsAttr(opts.SocketFDs)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, socks)
	}
	return attrs, nil
}

// execute sends one nbd family command with NLM_F_ACK (commands without a
// reply payload would otherwise wait for the library's 60 s socket
// timeout) and returns the reply messages' payloads.
func execute(fam nlFamily, cmd uint8, attrs []nl.NetlinkRequestData) ([][]byte, error) {
	req := nl.NewNetlinkRequest(int(fam.id), unix.NLM_F_ACK)
	req.AddData(&nl.Genlmsg{Command: cmd, Version: nlVersion})
	for _, a := range attrs {
		req.AddData(a)
	}
	return req.Execute(unix.NETLINK_GENERIC, 0)
}

// genlAttrs parses the attributes of a generic netlink payload.
func genlAttrs(msg []byte) ([]syscall.NetlinkRouteAttr, error) {
	if len(msg) < nl.SizeofGenlmsg {
		return nil, fmt.Errorf("nbdbridge: short generic netlink message (%d bytes)", len(msg))
	}
	return nl.ParseRouteAttr(msg[nl.SizeofGenlmsg:])
}

// parseIndex finds NBD_ATTR_INDEX in reply payloads.
func parseIndex(msgs [][]byte) (int, error) {
	for _, m := range msgs {
		attrs, err := genlAttrs(m)
		if err != nil {
			return -1, err
		}
		for _, a := range attrs {
			if a.Attr.Type&^unix.NLA_F_NESTED == nlAttrIndex && len(a.Value) >= 4 {
				return int(nl.NativeEndian().Uint32(a.Value)), nil
			}
		}
	}
	return -1, errors.New("nbdbridge: reply carries no device index")
}

// parseStatus decodes NBD_ATTR_DEVICE_LIST from reply payloads.
func parseStatus(msgs [][]byte) ([]DeviceStatus, error) {
	var out []DeviceStatus
	for _, m := range msgs {
		attrs, err := genlAttrs(m)
		if err != nil {
			return nil, err
		}
		for _, a := range attrs {
			if a.Attr.Type&^unix.NLA_F_NESTED != nlAttrDeviceList {
				continue
			}
			items, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				return nil, fmt.Errorf("parse device list: %w", err)
			}
			for _, it := range items {
				if it.Attr.Type&^unix.NLA_F_NESTED != nlDeviceItem {
					continue
				}
				fields, err := nl.ParseRouteAttr(it.Value)
				if err != nil {
					return nil, fmt.Errorf("parse device item: %w", err)
				}
				st := DeviceStatus{Index: -1}
				for _, f := range fields {
					switch f.Attr.Type {
					case nlDeviceIndex:
						if len(f.Value) >= 4 {
							st.Index = int(nl.NativeEndian().Uint32(f.Value))
						}
					case nlDeviceConnected:
						st.Connected = len(f.Value) >= 1 && f.Value[0] != 0
					}
				}
				if st.Index >= 0 {
					out = append(out, st)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b DeviceStatus) int { return a.Index - b.Index })
	return out, nil
}

// status runs NBD_CMD_STATUS; index -1 lists all devices.
func status(fam nlFamily, index int) ([]DeviceStatus, error) {
	var attrs []nl.NetlinkRequestData
	if index >= 0 {
		attrs = append(attrs, nl.NewRtAttr(nlAttrIndex, nl.Uint32Attr(uint32(index))))
	}
	msgs, err := execute(fam, nlCmdStatus, attrs)
	if err != nil {
		return nil, opError("status", index, err)
	}
	return parseStatus(msgs)
}

// deviceState returns whether index exists and whether it is connected.
func deviceState(fam nlFamily, index int) (exists, connected bool, err error) {
	list, err := status(fam, index)
	if err != nil {
		return false, false, err
	}
	for _, s := range list {
		if s.Index == index {
			return true, s.Connected, nil
		}
	}
	return false, false, nil
}

func noDeviceError(op string, index int, cause error) error {
	hint := "leave the device out to let the kernel pick a free one"
	limit := "nbds_max unknown"
	if n, err := (Sysfs{}).NBDSMax(); err == nil {
		limit = fmt.Sprintf("nbds_max=%d", n)
		if n > 0 {
			hint = fmt.Sprintf("use /dev/nbd0 to /dev/nbd%d, or %s", n-1, hint)
		}
	}
	return newKindError(ErrNoDevice, cause, "nbd %s: no such device %s (%s): %s", op, DevicePath(index), limit, hint)
}

// opError wraps a kernel error of a netlink operation on device index
// (-1: none) with the operation name and what the user can do.
func opError(op string, index int, err error) error {
	dev := ""
	if index >= 0 {
		dev = " " + DevicePath(index)
	}
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return newKindError(ErrNotRoot, err, "nbd %s%s: %v: %v", op, dev, ErrNotRoot, err)
	case errors.Is(err, unix.EBUSY) && index >= 0:
		return newKindError(ErrDeviceBusy, err,
			"nbd %s: device %s is already in use: detach it, pick another device or leave the device out to let the kernel pick a free one (%v)",
			op, DevicePath(index), err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("nbd %s%s: the kernel rejected the request (the kernel log, dmesg, names the reason): %w", op, dev, err)
	}
	return fmt.Errorf("nbd %s%s: %w", op, dev, err)
}

// Connect hands connected sockets to the kernel (NBD_CMD_CONNECT) and
// returns the index of the device it configured. The device's size is set
// when Connect returns, but its partitions are scanned only on the first
// open (see WaitReady).
func Connect(opts ConnectOptions) (int, error) {
	attrs, err := connectAttrs(opts)
	if err != nil {
		return -1, fmt.Errorf("nbd connect: %w", err)
	}
	fam, err := lookupFamily()
	if err != nil {
		return -1, err
	}
	if opts.Index >= 0 {
		// The kernel would create any missing index up to 2^20/max_part;
		// a device the user names must exist (nbds_max) instead.
		exists, connected, err := deviceState(fam, opts.Index)
		if err != nil {
			return -1, err
		}
		if !exists {
			return -1, noDeviceError("connect", opts.Index, nil)
		}
		if connected {
			return -1, opError("connect", opts.Index, unix.EBUSY)
		}
	}
	msgs, err := execute(fam, nlCmdConnect, attrs)
	if err != nil {
		return -1, opError("connect", opts.Index, err)
	}
	index, err := parseIndex(msgs)
	if err != nil {
		return -1, fmt.Errorf("nbd connect: %w", err)
	}
	return index, nil
}

// Reconfigure changes a connected device (NBD_CMD_RECONFIGURE): it slots
// new sockets into the places of dead ones, resizes or changes timeouts.
// Requests that were in flight on a dead socket are resent only when
// their timeout expires; requests queued while every socket was dead go
// to the new sockets at once.
func Reconfigure(index int, opts ReconfigureOptions) error {
	attrs, err := reconfigureAttrs(index, opts)
	if err != nil {
		return fmt.Errorf("nbd reconfigure: %w", err)
	}
	fam, err := lookupFamily()
	if err != nil {
		return err
	}
	if _, err := execute(fam, nlCmdReconfigure, attrs); err != nil {
		if errors.Is(err, unix.EINVAL) {
			if exists, connected, serr := deviceState(fam, index); serr == nil {
				switch {
				case !exists:
					return noDeviceError("reconfigure", index, err)
				case !connected:
					return newKindError(ErrNotConnected, err, "nbd reconfigure: %s is not connected: attach it first", DevicePath(index))
				}
			}
			if id, berr := DeviceBackend(index); berr == nil && id != opts.BackendID {
				return fmt.Errorf("nbd reconfigure %s: backend identifier %q does not match the device's %q: %w",
					DevicePath(index), opts.BackendID, id, err)
			}
		}
		return opError("reconfigure", index, err)
	}
	return nil
}

// Disconnect disconnects a device (NBD_CMD_DISCONNECT): the kernel sends
// NBD_CMD_DISC on every socket, shuts them down and fails I/O still in
// flight. It returns an error wrapping ErrNotConnected if the device is
// not connected and ErrNoDevice if it does not exist.
func Disconnect(index int) error {
	if index < 0 {
		return fmt.Errorf("nbdbridge: nbd disconnect: invalid device index %d", index)
	}
	fam, err := lookupFamily()
	if err != nil {
		return err
	}
	exists, connected, err := deviceState(fam, index)
	if err != nil {
		return err
	}
	if !exists {
		return noDeviceError("disconnect", index, nil)
	}
	if !connected {
		return newKindError(ErrNotConnected, nil, "nbd disconnect: %s is not connected", DevicePath(index))
	}
	attrs := []nl.NetlinkRequestData{nl.NewRtAttr(nlAttrIndex, nl.Uint32Attr(uint32(index)))}
	if _, err := execute(fam, nlCmdDisconnect, attrs); err != nil {
		return opError("disconnect", index, err)
	}
	return nil
}

// Status reports the connection state of device index, or of every device
// when index is -1, sorted by index. A device that does not exist yields
// an error wrapping ErrNoDevice.
func Status(index int) ([]DeviceStatus, error) {
	if index < -1 {
		return nil, fmt.Errorf("nbdbridge: nbd status: invalid device index %d", index)
	}
	fam, err := lookupFamily()
	if err != nil {
		return nil, err
	}
	list, err := status(fam, index)
	if err != nil {
		return nil, err
	}
	if index >= 0 && len(list) == 0 {
		return nil, noDeviceError("status", index, nil)
	}
	return list, nil
}

// parseLinkDead returns the device index of an NBD_CMD_LINK_DEAD message
// of family famID, or -1 if msg is something else.
func parseLinkDead(famID uint16, msg syscall.NetlinkMessage) int {
	if msg.Header.Type != famID || len(msg.Data) < nl.SizeofGenlmsg || msg.Data[0] != nlCmdLinkDead {
		return -1
	}
	idx, err := parseIndex([][]byte{msg.Data})
	if err != nil {
		return -1
	}
	return idx
}

// LinkDeadLost is sent by WatchLinkDead instead of a device index when the
// kernel dropped events because they were not read fast enough; the
// receiver should then check all its connections.
const LinkDeadLost = -1

// WatchLinkDead subscribes to the kernel's NBD_CMD_LINK_DEAD events and
// delivers the index of each device that lost a socket (a receive error,
// EOF or a request timeout marked it dead), or LinkDeadLost when events
// were dropped. The channel closes when ctx ends or the subscription
// fails. The kernel sends the events to the initial network namespace.
func WatchLinkDead(ctx context.Context) (<-chan int, error) {
	fam, err := lookupFamily()
	if err != nil {
		return nil, err
	}
	if fam.group == 0 {
		return nil, fmt.Errorf("nbdbridge: nbd watch: the kernel's nbd family has no %q multicast group", nlMcastGroup)
	}
	f, err := joinGroup(fam.group)
	if err != nil {
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("nbd watch: %w", err)
	}
	ch := make(chan int, 16)
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
		}
		f.Close() // wakes a pending read
	}()
	go func() {
		defer close(ch)
		defer close(done)
		w := linkDeadWatch{ctx: ctx, rc: rc, famID: fam.id, ch: ch}
		w.run()
	}()
	return ch, nil
}

// joinGroup opens a non-blocking generic netlink socket that receives the
// multicast group's messages. It is a raw socket with
// NETLINK_ADD_MEMBERSHIP: nl.Subscribe encodes groups in a 32-bit bind
// mask, but generic netlink group ids are dynamic.
func joinGroup(group uint32) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("nbd watch: netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nbd watch: bind netlink socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(group)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nbd watch: join multicast group %s: %w", nlMcastGroup, err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 256<<10) // best effort
	return os.NewFile(uintptr(fd), "nbd-netlink-events"), nil            // non-blocking: uses the poller
}

// linkDeadWatch reads LINK_DEAD events from a subscribed socket.
type linkDeadWatch struct {
	ctx   context.Context
	rc    syscall.RawConn
	famID uint16
	ch    chan<- int
}

// run delivers events until the socket is closed or fails, or ctx ends.
func (w *linkDeadWatch) run() {
	buf := make([]byte, 16<<10)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		err := w.rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		})
		if err != nil || w.ctx.Err() != nil {
			return // closed
		}
		switch {
		case rerr == unix.EINTR:
			continue
		case rerr == unix.ENOBUFS:
			if !w.send(LinkDeadLost) {
				return
			}
			continue
		case rerr != nil:
			return
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // only the kernel sends these
		}
		if !w.deliver(buf[:n]) {
			return
		}
	}
}

// deliver sends the device index of every LINK_DEAD message in b; false
// when ctx ended.
func (w *linkDeadWatch) deliver(b []byte) bool {
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return true
	}
	for _, m := range msgs {
		if idx := parseLinkDead(w.famID, m); idx >= 0 && !w.send(idx) {
			return false
		}
	}
	return true
}

func (w *linkDeadWatch) send(idx int) bool {
	select {
	case w.ch <- idx:
		return true
	case <-w.ctx.Done():
		return false
	}
}
