package nbdbridge

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestDeviceLockStateAndControl(t *testing.T) {
	t.Setenv("DNBD3GO_RUN_DIR", t.TempDir())
	l, ok, err := TryLockDevice(3)
	if err != nil || !ok {
		t.Fatalf("first lock: %v %v", ok, err)
	}
	// flock is per open file description: a second attempt, as another
	// daemon would make, fails while the first holds it.
	if _, ok2, err := TryLockDevice(3); ok2 || err != nil {
		t.Fatalf("second lock taken: %v %v", ok2, err)
	}
	if !Held(3) || Held(4) {
		t.Fatal("Held")
	}
	// a lock held by another process shows as held too
	if out, err := exec.Command("flock", "-n", RunDir()+"/nbd3.lock", "true").CombinedOutput(); err == nil {
		t.Fatalf("flock(1) got the lock: %s", out)
	}
	l.Unlock()
	if Held(3) {
		t.Fatal("still held after Unlock")
	}

	s := State{Index: 3, Device: "/dev/nbd3", PID: 42, BackendID: "dnbd3go:x:r1", Size: 1 << 20, BlockSize: 512,
		Connections: 4, Started: time.Unix(1, 0).UTC(), Info: map[string]string{"image": "x"}}
	if err := WriteState(s); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(3)
	if err != nil || got.BackendID != s.BackendID || got.Connections != 4 || got.Info["image"] != "x" {
		t.Fatalf("state %+v %v", got, err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	handler := func(req ControlRequest) (any, error) {
		switch req.Op {
		case "status":
			return map[string]int{"answer": 42}, nil
		case "resize":
			return map[string]int64{"size": req.Size}, nil
		}
		return nil, fmt.Errorf("unknown op %q", req.Op)
	}
	if err := ServeControl(ctx, 3, handler); err != nil {
		t.Fatal(err)
	}
	var v map[string]int
	if err := QueryControl(3, &v); err != nil || v["answer"] != 42 {
		t.Fatalf("control: %v %v", v, err)
	}
	var r map[string]int64
	if err := Control(3, ControlRequest{Op: "resize", Size: 77}, &r, time.Second); err != nil || r["size"] != 77 {
		t.Fatalf("resize: %v %v", r, err)
	}
	if err := Control(3, ControlRequest{Op: "bogus"}, nil, time.Second); err == nil || err.Error() != `unknown op "bogus"` {
		t.Fatalf("bogus op: %v", err)
	}
	RemoveState(3)
	if _, err := ReadState(3); err == nil {
		t.Fatal("state survived RemoveState")
	}
}

// TestServeControlAtGuards: a control socket never replaces a file that
// is not a socket, and answers only root and its own user, whatever the
// socket file's mode.
func TestServeControlAtGuards(t *testing.T) {
	dir, err := os.MkdirTemp("", "ctlguard") // not under t.TempDir's 0700 parent: another user connects below
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	handler := func(req ControlRequest) (any, error) { return map[string]string{"op": req.Op}, nil }
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("keep"), 0o644)
	if err := ServeControlAt(ctx, plain, handler); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("ServeControlAt over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(plain); string(b) != "keep" {
		t.Fatal("the regular file was replaced")
	}
	sock := filepath.Join(dir, "ctl")
	if err := ServeControlAt(ctx, sock, handler); err != nil {
		t.Fatal(err)
	}
	// A stale socket (the daemon died) is replaced.
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	if err := ServeControlAt(ctx2, sock, handler); err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	var v map[string]string
	if err := ControlAt(sock, ControlRequest{Op: "status"}, &v, time.Second); err != nil || v["op"] != "status" {
		t.Fatalf("own user: %v %v", v, err)
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIP the other-user half: needs root to run a client as nobody")
	}
	python := "/usr/bin/python3" // not a per-user shim nobody may not run
	if _, err := os.Stat(python); err != nil {
		t.Skip("SKIP the other-user half: no /usr/bin/python3 for the client")
	}
	os.Chmod(dir, 0o755)
	os.Chmod(sock, 0o666) // only the credential check stands in the way
	client := `import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
try:
    s.sendall(b'{"op":"status"}\n'); b=s.recv(4096)
except (ConnectionResetError, BrokenPipeError):
    b=b''
print("closed" if b==b'' else repr(b))`
	cmd := exec.Command(python, "-c", client, sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "closed" {
		t.Fatalf("another user got %q (err %v); want the connection closed unanswered", out, err)
	}
}
