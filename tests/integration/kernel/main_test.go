package kernel

import (
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"golang.org/x/sys/unix"
)

const skipMsg = "SKIP: needs root and /dev/nbd* (runs inside the VM harness: make test-integration)"

// inVM reports whether we run inside the harness's VM (its init sets
// DNBD3GO_VM=1) as root.
func inVM() bool { return os.Getenv("DNBD3GO_VM") == "1" && os.Geteuid() == 0 }

func TestMain(m *testing.M) {
	if !inVM() {
		fmt.Println(skipMsg)
	}
	os.Exit(m.Run())
}

// requireVM skips outside the harness's VM.
func requireVM(t *testing.T) {
	t.Helper()
	if !inVM() {
		t.Skip(skipMsg)
	}
}

// requireNBD skips unless the nbd driver is usable.
func requireNBD(t *testing.T) {
	t.Helper()
	requireVM(t)
	if err := nbdbridge.Available(); err != nil {
		t.Skipf("nbd is not available in this VM (booted with -no-nbd?): %v", err)
	}
}

// socketPair returns our end (served by a memServer) and the kernel's end.
func socketPair(t *testing.T) (net.Conn, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-ours")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	return c, fds[1]
}

// backendID is unique per test and process.
func backendID(t *testing.T) string {
	return fmt.Sprintf("dnbd3go-test:%s:%d", t.Name(), os.Getpid())
}

// attachment is a device connected to a memServer.
type attachment struct {
	idx    int
	id     string
	srv    *memServer
	conn   net.Conn
	served chan error // result of srv.serve(conn)
}

// attach serves srv on a new socketpair and CONNECTs it with opts
// (SocketFDs and, when empty, BackendID are filled in). Cleanup
// disconnects the device if it is still connected.
func attach(t *testing.T, srv *memServer, opts nbdbridge.ConnectOptions) *attachment {
	t.Helper()
	conn, kfd := socketPair(t)
	a := &attachment{srv: srv, conn: conn, served: make(chan error, 1)}
	go func() { a.served <- srv.serve(conn) }()
	if opts.BackendID == "" {
		opts.BackendID = backendID(t)
	}
	if opts.SizeBytes == 0 {
		opts.SizeBytes = uint64(srv.size())
	}
	opts.SocketFDs = []int{kfd}
	start := time.Now()
	idx, err := nbdbridge.Connect(opts)
	unix.Close(kfd) // the kernel holds its own reference
	if err != nil {
		conn.Close()
		t.Fatalf("Connect: %v", err)
	}
	t.Logf("connected %s in %v", nbdbridge.DevicePath(idx), time.Since(start).Round(time.Microsecond))
	a.idx, a.id = idx, opts.BackendID
	t.Cleanup(func() {
		if st, err := nbdbridge.Status(idx); err == nil && len(st) == 1 && st[0].Connected {
			if err := nbdbridge.Disconnect(idx); err != nil {
				t.Errorf("cleanup: Disconnect: %v", err)
			}
		}
		a.conn.Close()
	})
	return a
}

// connected returns the STATUS of device idx.
func connected(t *testing.T, idx int) bool {
	t.Helper()
	st, err := nbdbridge.Status(idx)
	if err != nil {
		t.Fatalf("Status(%d): %v", idx, err)
	}
	if len(st) != 1 || st[0].Index != idx {
		t.Fatalf("Status(%d) = %v", idx, st)
	}
	return st[0].Connected
}

// waitSize polls sysfs until device idx has size bytes.
func waitSize(t *testing.T, idx int, size int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := nbdbridge.DeviceSize(idx)
		if err == nil && got == size {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: size %d (%v), want %d", nbdbridge.DevicePath(idx), got, err, size)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openDirect opens a device for O_DIRECT I/O.
func openDirect(t *testing.T, path string, flag int) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, flag|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
