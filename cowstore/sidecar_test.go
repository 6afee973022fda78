package cowstore

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"

	"github.com/dnbd3go/dnbd3go/cowstore/mergertest"
	"github.com/dnbd3go/dnbd3go/cowstore/upload"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// longName is a 204-byte image name; its first 199 bytes are the name of
// another image.
var longName = strings.Repeat("d", 200) + "/img"

func longPrefix() string { return longName[:cowformat.NameField-1] }

// TestLongImageNameMergesIntoTheRightImage: two images whose names share
// the 199 bytes the header keeps (a 204-byte name and its prefix) get
// one session each; each session loads only under its own image's name
// and creates its merger session, and so its merge, under that name.
func TestLongImageNameMergesIntoTheRightImage(t *testing.T) {
	if len(longName) != 204 {
		t.Fatalf("test bug: name is %d bytes", len(longName))
	}
	remote := &memRemote{data: testutil.GenImage(0, 2*cowformat.ClusterSize)}
	srv := mergertest.Start(t)
	m, err := upload.NewMergerClient(srv.URL, upload.MergerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for i, name := range []string{longName, longPrefix()} {
		dir := t.TempDir()
		dirs[name] = dir
		o, err := Create(dir, Options{Remote: remote, ImageName: name, RID: 1, CommitInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		if o.ImageName() != name {
			t.Fatalf("ImageName() = %d bytes, want %d", len(o.ImageName()), len(name))
		}
		if _, err := o.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, cowformat.BlockSize), 0); err != nil {
			t.Fatal(err)
		}
		u := upload.New(o, m, upload.Config{MinDelay: -1, Logger: testutil.Logger(t)})
		res, err := u.Finish(context.Background(), true)
		if err != nil || !res.MergeAccepted {
			t.Fatalf("finish: %+v %v", res, err)
		}
		sess, _ := srv.Session(res.UUID)
		if sess.ImageName != name || len(sess.Merges) != 1 {
			t.Fatalf("session %d: merger session for image %q (%d bytes), %d merges; want %d bytes", i, sess.ImageName, len(sess.ImageName), len(sess.Merges), len(name))
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// the header holds the prefix in both; the sidecar tells them apart
	for name, dir := range dirs {
		other := longName
		if name == longName {
			other = longPrefix()
		}
		if _, err := Load(dir, Options{Remote: remote, ImageName: other, CommitInterval: -1}); err == nil || !strings.Contains(err.Error(), "belongs to image") {
			t.Errorf("session of %d bytes loaded as the %d-byte image: %v", len(name), len(other), err)
		}
		o, err := Load(dir, Options{Remote: remote, ImageName: name, CommitInterval: -1})
		if err != nil {
			t.Fatal(err)
		}
		if o.ImageName() != name {
			t.Errorf("loaded ImageName() = %d bytes, want %d", len(o.ImageName()), len(name))
		}
		o.Close()
	}
	// A session without the record (the reference client's) loads under
	// the name its header holds, but not under a longer name it cannot
	// tell from others.
	dir := dirs[longName]
	os.Remove(nameFile(dir))
	if _, err := Load(dir, Options{Remote: remote, ImageName: longName, CommitInterval: -1}); err == nil || !strings.Contains(err.Error(), nameFile(dir)) {
		t.Errorf("session without a name record loaded under a name longer than the header's: %v", err)
	}
	o, err := Load(dir, Options{Remote: remote, ImageName: longPrefix(), CommitInterval: -1})
	if err != nil {
		t.Fatalf("session without a name record under its header's name: %v", err)
	}
	o.Close()
	if b, err := os.ReadFile(nameFile(dir)); err != nil || string(b) != longPrefix() {
		t.Errorf("name record after loading: %q %v", b, err)
	}
}

// TestSessionLockChild is the child process of TestSessionLock: it opens
// the session in COWSTORE_LOCK_DIR, prints "OPEN" and waits to be killed.
func TestSessionLockChild(t *testing.T) {
	dir := os.Getenv("COWSTORE_LOCK_DIR")
	if dir == "" {
		t.Skip("SKIP: helper process of TestSessionLock")
	}
	if _, err := Load(dir, Options{Remote: &memRemote{data: make([]byte, cowformat.ClusterSize)}, ImageName: "img", CommitInterval: -1}); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fmt.Println("OPEN")
	select {}
}

// TestSessionLock: while a session is open, neither this process nor
// another can create or load a session in its directory, and the error
// names the holder's PID; the lock goes with Close, and with the process
// when it is killed.
func TestSessionLock(t *testing.T) {
	remote := &memRemote{data: make([]byte, cowformat.ClusterSize)}
	opts := Options{Remote: remote, ImageName: "img", RID: 1, CommitInterval: -1}
	dir := t.TempDir()
	o, err := Create(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	me := "process " + strconv.Itoa(os.Getpid())
	if _, err := Load(dir, opts); err == nil || !strings.Contains(err.Error(), me) {
		t.Fatalf("load of an open session: %v, want an error naming %s", err, me)
	}
	if _, err := Create(dir, opts); err == nil || !strings.Contains(err.Error(), me) {
		t.Fatalf("create in an open session's directory: %v, want an error naming %s", err, me)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}

	// another process holds it
	cmd := exec.Command(os.Args[0], "-test.run=^TestSessionLockChild$")
	cmd.Env = append(os.Environ(), "COWSTORE_LOCK_DIR="+dir)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "OPEN" {
		t.Fatalf("child: %q", line)
	}
	child := "process " + strconv.Itoa(cmd.Process.Pid)
	if _, err := Load(dir, opts); err == nil || !strings.Contains(err.Error(), child) {
		t.Fatalf("load of a session another process has open: %v, want an error naming %s", err, child)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	o, err = Load(dir, opts)
	if err != nil {
		t.Fatalf("load after the holder was killed: %v", err)
	}
	o.Close()
}
