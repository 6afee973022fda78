package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// batchImage is 3 MiB + 1000 bytes: reads near the end are zero-padded to
// the 4 KiB-rounded virtual size.
const batchImageSize = 3<<20 + 1000

// pipelinedMix sends, in one write, GET_BLOCKs that are copied and batched
// (up to copyMax), ones that go out with sendfile (larger), a zero-length
// one, one out of range (CMD_ERROR) and a KEEPALIVE in the middle, then
// checks every reply in order, byte for byte.
func pipelinedMix(t *testing.T, addr string, data []byte) {
	t.Helper()
	c := dial(t, addr)
	s := handshake(t, c, "mix", 1)
	vsize := int64(s.Size)
	padded := append(bytes.Clone(data), make([]byte, vsize-int64(len(data)))...)
	type want struct {
		cmd    protocol.Cmd
		handle uint64
		off, n int64
	}
	var wants []want
	var batch []byte
	add := func(cmd protocol.Cmd, handle uint64, off, n int64, w want) {
		h := protocol.Request{Cmd: cmd, Handle: handle, Offset: uint64(off), Size: uint32(n)}.Marshal()
		batch = append(batch, h[:]...)
		wants = append(wants, w)
	}
	get := func(handle uint64, off, n int64) {
		add(protocol.CmdGetBlock, handle, off, n, want{protocol.CmdGetBlock, handle, off, n})
	}
	for i := range int64(40) {
		get(uint64(i+1), i*4096+i, 4096)
	}
	get(100, 12345, copyMax)
	get(101, 5, copyMax+1)
	get(102, 1<<20, 1<<20)
	get(103, 7, 1)
	get(104, 0, 0)
	// KEEPALIVE carries the handle of the last GET_BLOCK (104)
	add(protocol.CmdKeepalive, 999, 0, 0, want{protocol.CmdKeepalive, 104, 0, 0})
	add(protocol.CmdGetBlock, 105, vsize, 4096, want{protocol.CmdError, 105, 0, 0})
	get(106, vsize-8192, 8192) // the padded tail, copied
	get(107, vsize-200000, 200000)
	for i := range int64(300) { // more than one batch buffer
		get(uint64(200+i), (i*7919*4096)%(vsize-4096), 4096)
	}
	go c.Write(batch)
	for i, w := range wants {
		r, p := readReply(t, c)
		if r.Cmd != w.cmd || r.Handle != w.handle || int64(len(p)) != w.n {
			t.Fatalf("reply %d: got cmd %d handle %d size %d, want %+v", i, r.Cmd, r.Handle, len(p), w)
		}
		if w.cmd == protocol.CmdGetBlock && !bytes.Equal(p, padded[w.off:w.off+w.n]) {
			t.Fatalf("reply %d (handle %d): wrong data for %d+%d", i, w.handle, w.off, w.n)
		}
	}
}

func startMixServer(t *testing.T) (*testServer, []byte) {
	base := t.TempDir()
	data := testutil.GenImage(0, batchImageSize)
	writeFile(t, filepath.Join(base, "mix.r1"), data)
	return startServer(t, base, "", nil), data
}

// waitBatchesReturned waits until every batch buffer is back in the pool.
func waitBatchesReturned(t *testing.T, ts *testServer, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ts.batches.inUse.Load() != want {
		if time.Now().After(deadline) {
			t.Fatalf("batch buffers in use: %d bytes, want %d", ts.batches.inUse.Load(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBatchedRepliesInOrder(t *testing.T) {
	ts, data := startMixServer(t)
	pipelinedMix(t, ts.addr, data)
	waitBatchesReturned(t, ts, 0)
}

// With the batch budget used up, small replies go out without a copy: the
// same bytes, and no buffer is taken.
func TestBatchBudgetExhaustedUsesZeroCopy(t *testing.T) {
	ts, data := startMixServer(t)
	ts.batches.inUse.Store(batchBudget)
	pipelinedMix(t, ts.addr, data)
	if got := ts.batches.inUse.Load(); got != batchBudget {
		t.Fatalf("batch buffers in use: %d, want %d", got, batchBudget)
	}
	ts.batches.inUse.Store(0)
}

// Data not in the page cache (RWF_NOWAIT fails) is read with an ordinary
// pread.
func TestBatchedRepliesFromColdFile(t *testing.T) {
	ts, data := startMixServer(t)
	f, err := os.Open(filepath.Join(ts.base, "mix.r1"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil { // dirty pages would stay cached
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	pipelinedMix(t, ts.addr, data)
}

// A client that goes away with replies queued returns the buffer.
func TestBatchReturnedWhenClientLeaves(t *testing.T) {
	ts, _ := startMixServer(t)
	c := dial(t, ts.addr)
	handshake(t, c, "mix", 1)
	var batch []byte
	for i := range 2000 {
		h := protocol.Request{Cmd: protocol.CmdGetBlock, Handle: uint64(i), Offset: uint64(i%700) * 4096, Size: 4096}.Marshal()
		batch = append(batch, h[:]...)
	}
	if _, err := c.Write(batch); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitBatchesReturned(t, ts, 0)
}

// Without pipes (none could be made 1 MiB) large replies use sendfile.
func TestLargeRepliesWithoutPipes(t *testing.T) {
	ts, data := startMixServer(t)
	ts.pipes.mu.Lock()
	ts.pipes.disabled = true
	ts.pipes.mu.Unlock()
	pipelinedMix(t, ts.addr, data)
	ts.pipes.mu.Lock()
	defer ts.pipes.mu.Unlock()
	if ts.pipes.open != 0 {
		t.Fatalf("%d pipes open", ts.pipes.open)
	}
}

// A client that leaves in the middle of large replies: the pipe that still
// holds data is closed, the others are back in the pool.
func TestPipesReturnedWhenClientLeaves(t *testing.T) {
	ts, _ := startMixServer(t)
	c := dial(t, ts.addr)
	handshake(t, c, "mix", 1)
	var batch []byte
	for i := range 8 {
		h := protocol.Request{Cmd: protocol.CmdGetBlock, Handle: uint64(i), Offset: uint64(i%3) << 20, Size: 1 << 20}.Marshal()
		batch = append(batch, h[:]...)
	}
	if _, err := c.Write(batch); err != nil {
		t.Fatal(err)
	}
	if r, _ := readReply(t, c); r.Size != 1<<20 {
		t.Fatalf("first reply %v", r)
	}
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ts.pipes.mu.Lock()
		open, free := ts.pipes.open, len(ts.pipes.free)
		ts.pipes.mu.Unlock()
		if open == free && len(ts.clientList()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pipes: %d open, %d free", open, free)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
