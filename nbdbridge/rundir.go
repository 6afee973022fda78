package nbdbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"golang.org/x/sys/unix"
)

// DefaultRunDir holds the per-device lock, state and control files of
// attached devices. Override it with $DNBD3GO_RUN_DIR (tests do).
const DefaultRunDir = "/run/dnbd3go"

// RunDir returns the run directory in effect.
func RunDir() string {
	if d := os.Getenv("DNBD3GO_RUN_DIR"); d != "" {
		return d
	}
	return DefaultRunDir
}

func runFile(index int, ext string) string {
	return filepath.Join(RunDir(), "nbd"+strconv.Itoa(index)+ext)
}

// DeviceLock is an exclusive flock on a device's lock file. A live daemon
// holds it for as long as it serves the device; the kernel releases it
// when the daemon dies, which is how a successor recognises an orphaned
// device it may take over.
type DeviceLock struct {
	f *os.File
}

// TryLockDevice takes the lock of device index without blocking. ok is
// false if another live process holds it.
func TryLockDevice(index int) (l *DeviceLock, ok bool, err error) {
	if err := os.MkdirAll(RunDir(), 0o755); err != nil {
		return nil, false, fmt.Errorf("create run directory: %w", err)
	}
	f, err := os.OpenFile(runFile(index, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, false, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return &DeviceLock{f: f}, true, nil
}

// Unlock releases the lock.
func (l *DeviceLock) Unlock() {
	if l != nil && l.f != nil {
		unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
		l.f.Close()
		l.f = nil
	}
}

// Held reports whether a live process holds device index's lock.
func Held(index int) bool {
	l, ok, err := TryLockDevice(index)
	if err != nil {
		return false
	}
	if ok {
		l.Unlock()
		return false
	}
	return true
}

// State is what a daemon records about the device it serves, so that a
// successor can take the device over with the same settings and `list`
// can describe it even when the daemon is gone.
type State struct {
	Index       int               `json:"index"`
	Device      string            `json:"device"`
	PID         int               `json:"pid"`
	BackendID   string            `json:"backendId"`
	Size        int64             `json:"size"`
	BlockSize   uint64            `json:"blockSize"`
	Connections int               `json:"connections"`
	ReadOnly    bool              `json:"readOnly"`
	Started     time.Time         `json:"started"`
	Info        map[string]string `json:"info,omitempty"` // e.g. image, rid, servers
}

// WriteState stores s atomically as the device's state file.
func WriteState(s State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(runFile(s.Index, ".json"), b, 0o644)
}

// ReadState loads a device's state file.
func ReadState(index int) (State, error) {
	var s State
	b, err := os.ReadFile(runFile(index, ".json"))
	if err != nil {
		return s, err
	}
	err = json.Unmarshal(b, &s)
	return s, err
}

// RemoveState deletes a device's state and control files (after a
// DISCONNECT).
func RemoveState(index int) {
	os.Remove(runFile(index, ".json"))
	os.Remove(runFile(index, ".sock"))
}

// ControlRequest is a request on a daemon's control socket: one JSON line.
type ControlRequest struct {
	Op     string `json:"op"`               // "status", "resize", "add-server", "remove-server", "switch-server", "unpin"
	Size   int64  `json:"size,omitempty"`   // for resize
	Server string `json:"server,omitempty"` // for the server operations: one host[:port]
}

// controlReply is the answer: one JSON object.
type controlReply struct {
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

// ControlHandler answers control requests.
type ControlHandler func(req ControlRequest) (any, error)

// ServeControl answers requests on the device's control socket until ctx
// ends. `dnbd3-nbd list`, `status` and `resize` use it.
func ServeControl(ctx context.Context, index int, handle ControlHandler) error {
	return ServeControlAt(ctx, runFile(index, ".sock"), handle)
}

// ServeControlAt answers requests on a control socket at path (mode 0600)
// until ctx ends; `dnbd3-nbd serve` puts one beside its unix socket. A
// stale socket at path is replaced; any other file there is an error.
// Only root and the daemon's own user may talk to it (checked with the
// peer's credentials, whatever the file mode), and at most
// maxControlConns requests are served at a time.
func ServeControlAt(ctx context.Context, path string, handle ControlHandler) error {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("nbdbridge: control socket: %s exists and is not a socket", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	os.Chmod(path, 0o600)
	go func() {
		<-ctx.Done()
		ln.Close()
		os.Remove(path)
	}()
	go acceptControl(ln.(*net.UnixListener), handle)
	return nil
}

// maxControlConns bounds the control requests served at a time.
const maxControlConns = 8

// acceptControl serves control connections until ln is closed.
func acceptControl(ln *net.UnixListener, handle ControlHandler) {
	sem := make(chan struct{}, maxControlConns)
	uid := os.Geteuid()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		if !peerAllowed(c, uid) {
			c.Close()
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close() // busy: the caller gets no answer and may retry
			continue
		}
		go func() {
			defer func() { <-sem }()
			serveControlConn(c, handle)
		}()
	}
}

// peerAllowed reports whether the process at the other end of c is root
// or runs as uid.
func peerAllowed(c *net.UnixConn, uid int) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || cerr != nil {
		return false
	}
	return cred.Uid == 0 || int(cred.Uid) == uid
}

func serveControlConn(c net.Conn, handle ControlHandler) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var req ControlRequest
	var rep controlReply
	if err := json.NewDecoder(io.LimitReader(c, 4096)).Decode(&req); err != nil {
		rep.Error = "bad request: " + err.Error()
	} else if v, err := handle(req); err != nil {
		rep.Error = err.Error()
	} else {
		rep.OK = true
		rep.Result, _ = json.Marshal(v)
	}
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	json.NewEncoder(c).Encode(rep)
}

// Control sends req to the daemon serving device index and decodes its
// result into v. The daemon's error comes back as an error.
func Control(index int, req ControlRequest, v any, timeout time.Duration) error {
	err := ControlAt(runFile(index, ".sock"), req, v, timeout)
	if errors.Is(err, errNoDaemon) {
		return fmt.Errorf("no dnbd3-nbd daemon answers for %s: %w", DevicePath(index), err)
	}
	return err
}

// errNoDaemon: nothing listens on the control socket.
var errNoDaemon = errors.New("nbdbridge: no control socket")

// ControlAt is Control for the control socket at path.
func ControlAt(path string, req ControlRequest, v any, timeout time.Duration) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return fmt.Errorf("%w: %w", errNoDaemon, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return err
	}
	var rep controlReply
	if err := json.NewDecoder(c).Decode(&rep); err != nil {
		return fmt.Errorf("read the daemon's answer: %w", err)
	}
	if !rep.OK {
		return errors.New(rep.Error)
	}
	if v != nil {
		return json.Unmarshal(rep.Result, v)
	}
	return nil
}

// QueryControl reads a live daemon's status into v.
func QueryControl(index int, v any) error {
	return Control(index, ControlRequest{Op: "status"}, v, 2*time.Second)
}
