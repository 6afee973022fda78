package nbdbridge

import (
	"context"
	"fmt"
	"os/exec"
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
