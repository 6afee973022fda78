package cowstore

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

const crashRemoteSize = 8 * cowformat.ClusterSize

func crashRemote() *memRemote { return &memRemote{data: testutil.GenImage(0, crashRemoteSize)} }

// crashBlock is what the writer puts into 4 KiB block b in round r.
func crashBlock(b, r int) []byte {
	p := bytes.Repeat([]byte{byte(r)}, cowformat.BlockSize)
	copy(p, fmt.Sprintf("block %d round %d;", b, r)) // ';': the fill byte may be a digit
	return p
}

// TestCrashWriter is the child process of TestFlushSurvivesSIGKILL.
func TestCrashWriter(t *testing.T) {
	dir := os.Getenv("COWSTORE_CRASH_DIR")
	if dir == "" {
		t.Skip("helper process for TestFlushSurvivesSIGKILL")
	}
	o, err := Create(dir, Options{Remote: crashRemote(), ImageName: "crash", RID: 1, CommitInterval: 50 * time.Millisecond})
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	blocks := crashRemoteSize / cowformat.BlockSize
	// round 1 over every 3rd block, unaligned by one byte on purpose for
	// some, then FLUSH
	for b := 0; b < blocks; b += 3 {
		o.WriteAt(crashBlock(b, 1), int64(b)*cowformat.BlockSize)
	}
	if err := o.Flush(); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fmt.Println("FLUSHED")
	// round 2 everywhere, never flushed explicitly, until killed
	for r := 2; ; r++ {
		for b := 0; b < blocks; b++ {
			o.WriteAt(crashBlock(b, r), int64(b)*cowformat.BlockSize)
		}
	}
}

// TestFlushSurvivesSIGKILL kills a writing process after its FLUSH and
// reloads the session: every flushed block is there, and every block holds
// the original, the flushed or some later version, never garbage.
func TestFlushSurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: -short (runs a child process for a few seconds)")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashWriter$", "-test.v")
	cmd.Env = append(os.Environ(), "COWSTORE_CRASH_DIR="+dir)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "ERROR") {
			t.Fatal(sc.Text())
		}
		if sc.Text() == "FLUSHED" {
			break
		}
	}
	time.Sleep(300 * time.Millisecond) // let it write (and background-commit) more
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	remote := crashRemote()
	o, err := Load(dir, Options{Remote: remote, ImageName: "crash", RID: 1, CommitInterval: -1})
	if err != nil {
		t.Fatalf("load after SIGKILL: %v", err)
	}
	defer o.Close()
	got := readAll(t, o)
	rounds := map[int]int{}
	for b := 0; b < crashRemoteSize/cowformat.BlockSize; b++ {
		blk := got[b*cowformat.BlockSize : (b+1)*cowformat.BlockSize]
		var r int
		if _, err := fmt.Sscanf(string(blk[:24]), "block %d round %d;", new(int), &r); err != nil || !bytes.Equal(blk, crashBlock(b, r)) {
			if bytes.Equal(blk, remote.data[b*cowformat.BlockSize:(b+1)*cowformat.BlockSize]) && b%3 != 0 {
				rounds[0]++
				continue // never written and unflushed writes lost: fine
			}
			t.Fatalf("block %d is neither original nor a written version: %q", b, blk[:24])
		}
		if b%3 == 0 && r < 1 {
			t.Fatalf("block %d lost its flushed write", b)
		}
		rounds[r]++
	}
	t.Logf("blocks by round after SIGKILL: %v", rounds)
}
