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
	Op   string `json:"op"`             // "status" or "resize"
	Size int64  `json:"size,omitempty"` // for resize
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
	path := runFile(index, ".sock")
	os.Remove(path)
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
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveControlConn(c, handle)
		}
	}()
	return nil
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
	c, err := net.DialTimeout("unix", runFile(index, ".sock"), time.Second)
	if err != nil {
		return fmt.Errorf("no dnbd3-nbd daemon answers for %s: %w", DevicePath(index), err)
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
