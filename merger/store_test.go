package merger

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// stored reads back every cluster of a session from its store, checking
// each CRC, as uploads.
func stored(t *testing.T, m *Manager, id string) map[int]*upload {
	t.Helper()
	s, err := m.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock() // keeps the store open
	defer s.mu.Unlock()
	st, err := m.openStoreLocked(s, false)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[int]*upload)
	buf := make([]byte, cowformat.ClusterSize)
	for _, v := range st.snapshot() {
		blocks, err := st.readVersion(&v, buf)
		if err != nil {
			t.Fatal(err)
		}
		u := &upload{cluster: int(v.cluster)}
		k := 0
		for i := 0; i < cowformat.ClusterBlocks; i++ {
			if v.bitfield[i/8]&(1<<(i%8)) != 0 {
				u.blocks[i] = append([]byte(nil), blocks[k*cowformat.BlockSize:(k+1)*cowformat.BlockSize]...)
				k++
			}
		}
		out[u.cluster] = u
	}
	return out
}

// sameUpload reports whether two uploads hold the same blocks.
func sameUpload(a, b *upload) bool {
	if a.cluster != b.cluster {
		return false
	}
	for i := range a.blocks {
		if (a.blocks[i] == nil) != (b.blocks[i] == nil) || !bytes.Equal(a.blocks[i], b.blocks[i]) {
			return false
		}
	}
	return true
}

func latestUploads(ups []*upload) map[int]*upload {
	out := make(map[int]*upload)
	for _, u := range ups {
		out[u.cluster] = u
	}
	return out
}

func checkStored(t *testing.T, m *Manager, id string, want map[int]*upload) {
	t.Helper()
	got := stored(t, m, id)
	if len(got) != len(want) {
		t.Fatalf("%d clusters stored, want %d", len(got), len(want))
	}
	for c, w := range want {
		if g, ok := got[c]; !ok || !sameUpload(g, w) {
			t.Fatalf("cluster %d: stored version differs from the last upload", c)
		}
	}
}

func TestUploadsSurviveRestart(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(21, 22))
	original := randBytes(rng, 10<<20)
	size := int64(len(original))
	e.original("keep", 1, original)
	m := e.manager(nil)
	info, _ := m.Create("keep", 1, cowformat.BitfieldSize)
	ups := testUploads(rng, size)
	for i, u := range ups {
		mustUpdate(t, m, info.UUID, u, i%2 == 1)
	}
	top1, err := m.TopModified(info.UUID, 5)
	if err != nil {
		t.Fatal(err)
	}
	// The model's counts: uploads per cluster.
	counts := make(map[int]uint32)
	for _, u := range ups {
		counts[u.cluster]++
	}
	if len(top1) != 5 || top1[0].Cluster != 0 || top1[0].Modifications != counts[0] {
		t.Fatalf("top modified: %+v (cluster 0 has %d uploads)", top1, counts[0])
	}
	for i, c := range top1 {
		if c.Modifications != counts[c.Cluster] || (i > 0 && c.Modifications > top1[i-1].Modifications) {
			t.Fatalf("top modified: %+v, counts %v", top1, counts)
		}
	}
	m.Close()

	m = e.manager(nil)
	st, err := m.Status(info.UUID)
	if err != nil || st.State != StateActive || st.TotalClusters != len(latestUploads(ups)) {
		t.Fatalf("after restart: %+v, %v", st, err)
	}
	top2, _ := m.TopModified(info.UUID, 5)
	if fmt.Sprint(top1) != fmt.Sprint(top2) {
		t.Fatalf("modification counts changed by the restart: %v, then %v", top1, top2)
	}
	checkStored(t, m, info.UUID, latestUploads(ups))
	// More uploads after the restart, then merge.
	more := randomUpload(rng, 2, 0.2)
	mustUpdate(t, m, info.UUID, more, false)
	ups = append(ups, more)
	mergeDone(t, m, info.UUID, size, size)
	sameBytes(t, "merged", e.destFile("keep.r2"), expectedImage(original, ups, size, size))
}

func TestJournalTornTail(t *testing.T) {
	for _, damage := range []string{"cut", "garbage", "zeros"} {
		t.Run(damage, func(t *testing.T) {
			e := newEnv(t)
			rng := rand.New(rand.NewPCG(23, 24))
			original := randBytes(rng, 4<<20)
			size := int64(len(original))
			e.original("torn", 1, original)
			m := e.manager(nil)
			info, _ := m.Create("torn", 1, cowformat.BitfieldSize)
			a1, b, a2 := randomUpload(rng, 1, 0.5), randomUpload(rng, 2, 0.1), randomUpload(rng, 1, 0.05)
			for _, u := range []*upload{a1, b, a2} {
				mustUpdate(t, m, info.UUID, u, false)
			}
			m.Close()
			jpath := filepath.Join(e.work, info.UUID, journalFileName)
			fi, _ := os.Stat(jpath)
			if fi.Size() != journalHeaderSize+3*journalRecordSize {
				t.Fatalf("journal is %d bytes", fi.Size())
			}
			switch damage {
			case "cut": // the last record was being written
				os.Truncate(jpath, fi.Size()-5)
			case "garbage": // a record of a batch whose fsync never completed
				f, _ := os.OpenFile(jpath, os.O_WRONLY|os.O_APPEND, 0)
				f.Write(randBytes(rng, journalRecordSize+30))
				f.Close()
			case "zeros": // the file grew but the data never reached the disk
				os.Truncate(jpath, fi.Size()+2*journalRecordSize)
			}
			m = e.manager(nil)
			want := map[int]*upload{1: a2, 2: b}
			if damage == "cut" {
				want[1] = a1 // the torn record is dropped, only it
			}
			checkStored(t, m, info.UUID, want)
			fi, _ = os.Stat(jpath)
			wantSize := int64(journalHeaderSize + 3*journalRecordSize)
			if damage == "cut" {
				wantSize -= journalRecordSize
			}
			if fi.Size() != wantSize {
				t.Fatalf("journal is %d bytes after replay, want %d (torn tail cut off)", fi.Size(), wantSize)
			}
			// The session goes on normally.
			c := randomUpload(rng, 3, 0.3)
			mustUpdate(t, m, info.UUID, c, true)
			want[3] = c
			m.Close()
			m = e.manager(nil)
			checkStored(t, m, info.UUID, want)
			mergeDone(t, m, info.UUID, size, size)
			sameBytes(t, "merged", e.destFile("torn.r2"), expectedImage(original, []*upload{want[1], want[2], want[3]}, size, size))
		})
	}
}

func TestCorruptBlockFailsMerge(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(25, 26))
	original := randBytes(rng, 4<<20)
	size := int64(len(original))
	e.original("rot", 1, original)
	m := e.manager(nil)
	info, _ := m.Create("rot", 1, cowformat.BitfieldSize)
	for c := 0; c < 3; c++ {
		mustUpdate(t, m, info.UUID, randomUpload(rng, c, 0.5), false)
	}
	m.Close()
	// Flip one bit in the middle of the stored data.
	dpath := filepath.Join(e.work, info.UUID, dataFileName)
	f, err := os.OpenFile(dpath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	one := make([]byte, 1)
	f.ReadAt(one, cowformat.ClusterSize+5000)
	one[0] ^= 0x10
	f.WriteAt(one, cowformat.ClusterSize+5000)
	f.Close()

	m = e.manager(nil)
	if _, err := m.Merge(info.UUID, size, size); err != nil {
		t.Fatal(err)
	}
	st := waitFinished(t, m, info.UUID)
	if st.State != StateFailed || !strings.Contains(st.Error, "stored data is corrupt") || !strings.Contains(st.Error, "cluster") {
		t.Fatalf("%+v", st)
	}
	if e.destFile("rot.r2") != nil {
		t.Fatal("a corrupt revision was produced")
	}
	e.noTempFiles()
}

func TestConcurrentUploads(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(27, 28))
	original := randBytes(rng, 30*cowformat.ClusterSize)
	size := int64(len(original))
	e.original("conc", 1, original)
	m := e.manager(nil)
	info, _ := m.Create("conc", 1, cowformat.BitfieldSize)
	const workers, rounds = 12, 8
	perWorker := make([][]*upload, workers)
	for w := range perWorker {
		r := rand.New(rand.NewPCG(uint64(w), 99))
		for i := 0; i < rounds; i++ {
			// worker w owns clusters w and w+workers
			perWorker[w] = append(perWorker[w], randomUpload(r, w+workers*(i%2), []float64{1, 0.1, 0.5}[i%3]))
		}
	}
	var wg sync.WaitGroup
	for w := range perWorker {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i, u := range perWorker[w] {
				if err := m.Update(info.UUID, u.update(i%2 == 0)); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	var all []*upload
	for _, ups := range perWorker {
		all = append(all, ups...)
	}
	s, _ := m.lookup(info.UUID)
	s.st.j.mu.Lock()
	batches := s.st.j.batches
	s.st.j.mu.Unlock()
	t.Logf("%d uploads committed in %d journal batches", len(all), batches)
	if batches > uint64(len(all)) || batches == 0 {
		t.Fatalf("%d batches for %d uploads", batches, len(all))
	}
	checkStored(t, m, info.UUID, latestUploads(all))
	top, _ := m.TopModified(info.UUID, 100)
	for _, c := range top {
		if c.Modifications != rounds/2 {
			t.Fatalf("cluster %d: %d modifications, want %d", c.Cluster, c.Modifications, rounds/2)
		}
	}
	// Slots are reused: the data file holds no more than the live
	// versions plus those in flight.
	s.mu.Lock()
	inUse := s.st.slots.inUse()
	s.mu.Unlock()
	if inUse != 2*workers {
		t.Fatalf("%d slots in use for %d clusters", inUse, 2*workers)
	}
	mergeDone(t, m, info.UUID, size, size)
	sameBytes(t, "merged", e.destFile("conc.r2"), expectedImage(original, all, size, size))
}

func TestJournalCompaction(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(29, 30))
	e.original("compact", 1, randBytes(rng, cowformat.ClusterSize))
	m := e.manager(nil)
	info, _ := m.Create("compact", 1, cowformat.BitfieldSize)
	var ups []*upload
	for i := 0; i < 1100; i++ {
		u := &upload{cluster: i % 3}
		u.blocks[i%cowformat.ClusterBlocks] = randBytes(rng, cowformat.BlockSize)
		ups = append(ups, u)
		mustUpdate(t, m, info.UUID, u, false)
	}
	m.Close()
	m = e.manager(nil)
	checkStored(t, m, info.UUID, latestUploads(ups))
	fi, _ := os.Stat(filepath.Join(e.work, info.UUID, journalFileName))
	if fi.Size() != journalHeaderSize+3*journalRecordSize {
		t.Fatalf("journal is %d bytes after compaction", fi.Size())
	}
	top, _ := m.TopModified(info.UUID, 3)
	if len(top) != 3 || top[0].Modifications+top[1].Modifications+top[2].Modifications != 1100 {
		t.Fatalf("modification counts lost by compaction: %+v", top)
	}
}

// crashUpload is version v of cluster c in the SIGKILL test: its blocks
// and their number depend on c and v, and every block names c, v and its
// bit, so a stored cluster tells which version it is.
func crashUpload(c, v int) *upload {
	u := &upload{cluster: c}
	for bit := 0; bit < cowformat.ClusterBlocks; bit++ {
		if (bit*7+v+c)%11 < 1+v%4 {
			b := bytes.Repeat([]byte{byte(v)}, cowformat.BlockSize)
			copy(b, fmt.Sprintf("c=%d v=%d bit=%d;", c, v, bit))
			u.blocks[bit] = b
		}
	}
	return u
}

// crashVersion decodes the version of a stored crash-test cluster.
func crashVersion(u *upload) int {
	for _, b := range u.blocks {
		if b != nil {
			var c, v, bit int
			fmt.Sscanf(string(b[:40]), "c=%d v=%d bit=%d;", &c, &v, &bit)
			return v
		}
	}
	return -1
}

const crashClusters = 16

// TestUploadCrashChild is the child process of TestUploadsSurviveSIGKILL:
// it uploads forever and prints a line for every acknowledged upload.
func TestUploadCrashChild(t *testing.T) {
	root := os.Getenv("MERGER_CRASH_DIR")
	if root == "" {
		t.Skip("helper process for TestUploadsSurviveSIGKILL")
	}
	m, err := NewManager(Config{WorkingDirectory: filepath.Join(root, "work"),
		OriginalImageDirectory: filepath.Join(root, "orig"), DestinationDirectory: filepath.Join(root, "dest")})
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	info, err := m.Create("crash", 1, cowformat.BitfieldSize)
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	fmt.Println("UUID", info.UUID)
	var mu sync.Mutex // one line at a time
	const workers = 4
	for w := 0; w < workers; w++ {
		go func() {
			for v := 1; ; v++ {
				for c := w; c < crashClusters; c += workers {
					if err := m.Update(info.UUID, crashUpload(c, v).update(v%3 == 0)); err != nil {
						fmt.Println("ERROR", err)
						os.Exit(1)
					}
					mu.Lock()
					fmt.Printf("ACK %d %d .\n", c, v)
					mu.Unlock()
				}
			}
		}()
	}
	select {}
}

// TestUploadsSurviveSIGKILL kills a process that uploads in a loop and
// reloads its session: every upload acknowledged before the kill is
// there (or a newer version of the same cluster), intact.
func TestUploadsSurviveSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a child process")
	}
	root := t.TempDir()
	for _, d := range []string{"work", "orig", "dest"} {
		os.Mkdir(filepath.Join(root, d), 0o755)
	}
	rng := rand.New(rand.NewPCG(31, 32))
	original := randBytes(rng, crashClusters*cowformat.ClusterSize-1000)
	os.WriteFile(filepath.Join(root, "orig", "crash.r1"), original, 0o644)

	cmd := exec.Command(os.Args[0], "-test.run=^TestUploadCrashChild$")
	cmd.Env = append(os.Environ(), "MERGER_CRASH_DIR="+root)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	acked := make(map[int]int)
	var id string
	acks := 0
	deadline := time.Now().Add(20 * time.Second)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 1 && f[0] == "ERROR":
			cmd.Process.Kill()
			t.Fatal(sc.Text())
		case len(f) == 2 && f[0] == "UUID":
			id = f[1]
		case len(f) == 4 && f[0] == "ACK" && f[3] == ".":
			c, _ := strconv.Atoi(f[1])
			v, _ := strconv.Atoi(f[2])
			acked[c] = max(acked[c], v)
			acks++
		}
		if acks >= 400 || time.Now().After(deadline) {
			break
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if id == "" || acks == 0 {
		t.Fatalf("the child acknowledged nothing (uuid %q)", id)
	}
	t.Logf("killed after %d acknowledged uploads", acks)

	m, err := NewManager(Config{WorkingDirectory: filepath.Join(root, "work"),
		OriginalImageDirectory: filepath.Join(root, "orig"), DestinationDirectory: filepath.Join(root, "dest")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got := stored(t, m, id)
	var final []*upload
	for c := 0; c < crashClusters; c++ {
		u, ok := got[c]
		if !ok {
			if acked[c] > 0 {
				t.Fatalf("cluster %d: acknowledged version %d is lost", c, acked[c])
			}
			continue
		}
		v := crashVersion(u)
		if v < acked[c] {
			t.Fatalf("cluster %d: stored version %d is older than the acknowledged %d", c, v, acked[c])
		}
		if !sameUpload(u, crashUpload(c, v)) {
			t.Fatalf("cluster %d: stored version %d is not what was uploaded", c, v)
		}
		final = append(final, u)
	}
	// And it merges.
	size := int64(len(original))
	mergeDone(t, m, id, size, size)
	b, _ := os.ReadFile(filepath.Join(root, "dest", "crash.r2"))
	sameBytes(t, "merged", b, expectedImage(original, final, size, size))
}
