package nbdbridge

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// genlPayload serializes attributes behind a generic netlink header, as
// the kernel's replies (and our requests) look.
func genlPayload(cmd uint8, attrs []nl.NetlinkRequestData) []byte {
	b := (&nl.Genlmsg{Command: cmd, Version: nlVersion}).Serialize()
	for _, a := range attrs {
		b = append(b, a.Serialize()...)
	}
	return b
}

// decoded is a flat view of request attributes for assertions.
type decoded struct {
	u64     map[uint16]uint64
	index   int
	backend string
	fds     []int
}

func decode(t *testing.T, attrs []nl.NetlinkRequestData) decoded {
	t.Helper()
	parsed, err := genlAttrs(genlPayload(nlCmdConnect, attrs))
	if err != nil {
		t.Fatal(err)
	}
	d := decoded{u64: map[uint16]uint64{}, index: -1}
	ne := nl.NativeEndian()
	for _, a := range parsed {
		typ := a.Attr.Type &^ unix.NLA_F_NESTED
		switch typ {
		case nlAttrIndex:
			d.index = int(ne.Uint32(a.Value))
		case nlAttrBackendID:
			if a.Value[len(a.Value)-1] != 0 {
				t.Fatalf("backend identifier %q is not NUL-terminated", a.Value)
			}
			d.backend = string(a.Value[:len(a.Value)-1])
		case nlAttrSockets:
			if a.Attr.Type&unix.NLA_F_NESTED == 0 {
				t.Fatal("SOCKETS lacks NLA_F_NESTED")
			}
			items, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				t.Fatal(err)
			}
			for _, it := range items {
				if it.Attr.Type != nlSockItem|unix.NLA_F_NESTED {
					t.Fatalf("socket item type %#x", it.Attr.Type)
				}
				fds, err := nl.ParseRouteAttr(it.Value)
				if err != nil || len(fds) != 1 || fds[0].Attr.Type != nlSockFD {
					t.Fatalf("socket item %v, %v", fds, err)
				}
				d.fds = append(d.fds, int(ne.Uint32(fds[0].Value)))
			}
		default:
			if len(a.Value) != 8 {
				t.Fatalf("attribute %d has %d bytes, want u64", typ, len(a.Value))
			}
			d.u64[typ] = ne.Uint64(a.Value)
		}
	}
	return d
}

func TestConnectAttrs(t *testing.T) {
	attrs, err := connectAttrs(ConnectOptions{
		Index: 5, SizeBytes: 1 << 30, BlockSize: 4096, ServerFlags: 1 | 2 | nlServerFlagCanMultiConn,
		ClientFlags: ClientFlagDestroyOnDisconnect, Timeout: 1500 * time.Millisecond, DeadConnTimeout: 2 * time.Minute,
		BackendID: "dnbd3:img.r3", SocketFDs: []int{7, 9},
	})
	if err != nil {
		t.Fatal(err)
	}
	d := decode(t, attrs)
	if d.index != 5 || d.backend != "dnbd3:img.r3" || len(d.fds) != 2 || d.fds[0] != 7 || d.fds[1] != 9 {
		t.Fatalf("decoded %+v", d)
	}
	want := map[uint16]uint64{nlAttrSizeBytes: 1 << 30, nlAttrBlockSize: 4096, nlAttrServerFlags: 0x103,
		nlAttrClientFlags: 1, nlAttrTimeout: 2, nlAttrDeadConnTimeout: 120}
	for k, v := range want {
		if d.u64[k] != v {
			t.Errorf("attribute %d = %d, want %d", k, d.u64[k], v)
		}
	}

	// defaults: no index, block size 512, no timeout, no backend
	attrs, err = connectAttrs(ConnectOptions{Index: -1, SizeBytes: 512 * 3, SocketFDs: []int{3}})
	if err != nil {
		t.Fatal(err)
	}
	d = decode(t, attrs)
	if d.index != -1 || d.backend != "" || d.u64[nlAttrBlockSize] != 512 || d.u64[nlAttrDeadConnTimeout] != 0 {
		t.Fatalf("defaults decoded %+v", d)
	}
	if v, ok := d.u64[nlAttrTimeout]; !ok || v != 0 {
		t.Fatalf("TIMEOUT for a zero timeout: sent=%v value=%d; want 0 sent (resets a reused device)", ok, v)
	}
}

func TestConnectAttrsValidation(t *testing.T) {
	ok := ConnectOptions{Index: -1, SizeBytes: 1 << 20, SocketFDs: []int{3}}
	cases := map[string]func(o *ConnectOptions){
		"index below -1":      func(o *ConnectOptions) { o.Index = -2 },
		"zero size":           func(o *ConnectOptions) { o.SizeBytes = 0 },
		"unaligned size":      func(o *ConnectOptions) { o.SizeBytes = 1<<20 + 100 },
		"size vs block size":  func(o *ConnectOptions) { o.BlockSize = 4096; o.SizeBytes = 4096*3 + 512 },
		"block size 1024+1":   func(o *ConnectOptions) { o.BlockSize = 1025 },
		"block size 256":      func(o *ConnectOptions) { o.BlockSize = 256 },
		"block size 8192":     func(o *ConnectOptions) { o.BlockSize = 8192 },
		"no sockets":          func(o *ConnectOptions) { o.SocketFDs = nil },
		"negative fd":         func(o *ConnectOptions) { o.SocketFDs = []int{-1} },
		"multi without flag":  func(o *ConnectOptions) { o.SocketFDs = []int{3, 4} },
		"negative timeout":    func(o *ConnectOptions) { o.Timeout = -time.Second },
		"negative dead":       func(o *ConnectOptions) { o.DeadConnTimeout = -time.Second },
		"NUL in backend id":   func(o *ConnectOptions) { o.BackendID = "a\x00b" },
		"block size 0 is 512": nil,
	}
	for name, mod := range cases {
		o := ok
		o.SocketFDs = append([]int(nil), ok.SocketFDs...)
		if mod == nil {
			if _, err := connectAttrs(o); err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		mod(&o)
		if _, err := connectAttrs(o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestReconfigureAttrs(t *testing.T) {
	attrs, err := reconfigureAttrs(2, ReconfigureOptions{BackendID: "id", SocketFDs: []int{11}})
	if err != nil {
		t.Fatal(err)
	}
	d := decode(t, attrs)
	if d.index != 2 || d.backend != "id" || len(d.fds) != 1 || d.fds[0] != 11 || len(d.u64) != 0 {
		t.Fatalf("decoded %+v", d)
	}
	attrs, err = reconfigureAttrs(2, ReconfigureOptions{BackendID: "id", SizeBytes: 8192, BlockSize: 4096,
		Timeout: time.Second, DeadConnTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	d = decode(t, attrs)
	if d.u64[nlAttrSizeBytes] != 8192 || d.u64[nlAttrBlockSize] != 4096 || d.u64[nlAttrTimeout] != 1 ||
		d.u64[nlAttrDeadConnTimeout] != 10 || len(d.fds) != 0 {
		t.Fatalf("decoded %+v", d)
	}
	for name, o := range map[string]ReconfigureOptions{
		"bad block size": {BlockSize: 3000},
		"unaligned size": {BlockSize: 4096, SizeBytes: 4096 + 512},
		"negative":       {Timeout: -1},
	} {
		if _, err := reconfigureAttrs(2, o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := reconfigureAttrs(-1, ReconfigureOptions{}); err == nil {
		t.Error("index -1 accepted")
	}
}

func u32(v uint32) []byte { return nl.Uint32Attr(v) }

func TestParseStatusAndIndex(t *testing.T) {
	list := nl.NewRtAttr(nlAttrDeviceList, nil) // the kernel sets no NESTED flag here
	for _, dev := range []struct {
		idx  uint32
		conn uint8
	}{{3, 1}, {0, 0}, {1, 1}} {
		item := list.AddRtAttr(nlDeviceItem, nil)
		item.AddRtAttr(nlDeviceIndex, u32(dev.idx))
		item.AddRtAttr(nlDeviceConnected, []byte{dev.conn})
	}
	got, err := parseStatus([][]byte{genlPayload(nlCmdStatus, []nl.NetlinkRequestData{list})})
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceStatus{{0, false}, {1, true}, {3, true}}
	if len(got) != len(want) {
		t.Fatalf("parseStatus = %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("parseStatus = %v, want %v", got, want)
		}
	}
	if got, err := parseStatus([][]byte{genlPayload(nlCmdStatus, nil)}); err != nil || len(got) != 0 {
		t.Fatalf("empty status = %v, %v", got, err)
	}
	if _, err := parseStatus([][]byte{{1, 2}}); err == nil {
		t.Fatal("short message accepted")
	}

	idx, err := parseIndex([][]byte{genlPayload(nlCmdConnect, []nl.NetlinkRequestData{nl.NewRtAttr(nlAttrIndex, u32(7))})})
	if err != nil || idx != 7 {
		t.Fatalf("parseIndex = %d, %v", idx, err)
	}
	if _, err := parseIndex([][]byte{genlPayload(nlCmdConnect, nil)}); err == nil {
		t.Fatal("reply without index accepted")
	}
}

func TestParseLinkDead(t *testing.T) {
	const fam = 0x1c
	msg := func(typ uint16, cmd uint8, attrs ...nl.NetlinkRequestData) syscall.NetlinkMessage {
		return syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: typ}, Data: genlPayload(cmd, attrs)}
	}
	if got := parseLinkDead(fam, msg(fam, nlCmdLinkDead, nl.NewRtAttr(nlAttrIndex, u32(4)))); got != 4 {
		t.Fatalf("LINK_DEAD index = %d", got)
	}
	for name, m := range map[string]syscall.NetlinkMessage{
		"other family":  msg(fam+1, nlCmdLinkDead, nl.NewRtAttr(nlAttrIndex, u32(4))),
		"other command": msg(fam, nlCmdStatus, nl.NewRtAttr(nlAttrIndex, u32(4))),
		"no index":      msg(fam, nlCmdLinkDead),
		"short":         {Header: syscall.NlMsghdr{Type: fam}, Data: []byte{4}},
	} {
		if got := parseLinkDead(fam, m); got != -1 {
			t.Errorf("%s: parseLinkDead = %d", name, got)
		}
	}
}

func TestOpErrors(t *testing.T) {
	err := opError("connect", 3, unix.EBUSY)
	if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "device /dev/nbd3 is already in use") {
		t.Fatalf("EBUSY: %v", err)
	}
	err = opError("reconfigure", 3, unix.EPERM)
	if !errors.Is(err, ErrNotRoot) || !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "CAP_SYS_ADMIN") ||
		!strings.HasPrefix(err.Error(), "nbd reconfigure /dev/nbd3:") {
		t.Fatalf("EPERM: %v", err)
	}
	if err := opError("disconnect", 1, unix.EACCES); !errors.Is(err, ErrNotRoot) {
		t.Fatalf("EACCES: %v", err)
	}
	err = opError("connect", -1, unix.EINVAL)
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "dmesg") || strings.Contains(err.Error(), "/dev/") {
		t.Fatalf("EINVAL: %v", err)
	}
	err = opError("status", -1, unix.ENOMEM)
	if !errors.Is(err, unix.ENOMEM) || !strings.HasPrefix(err.Error(), "nbd status:") {
		t.Fatalf("ENOMEM: %v", err)
	}
	err = noDeviceError("connect", 20, nil)
	if !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "no such device /dev/nbd20") || !strings.Contains(err.Error(), "nbds_max") {
		t.Fatalf("no device: %v", err)
	}
	if ErrNoModule.Error() != "nbdbridge: nbd kernel module not loaded: run `modprobe nbd`" {
		t.Fatalf("ErrNoModule text %q", ErrNoModule)
	}
}

func TestSeconds(t *testing.T) {
	for d, want := range map[time.Duration]uint64{0: 0, 1: 1, time.Second: 1, time.Second + 1: 2, 90 * time.Second: 90} {
		if got, err := seconds("t", d); err != nil || got != want {
			t.Errorf("seconds(%v) = %d, %v; want %d", d, got, err, want)
		}
	}
}
