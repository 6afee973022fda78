package merger

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// testUploads returns a varied upload history over the clusters of an
// image of size bytes and a few beyond: sparse and dense clusters,
// re-uploads with fewer bits (replace semantics), a cluster cleared by an
// all-zero bitfield, the unaligned last cluster and clusters past the end.
func testUploads(rng *rand.Rand, size int64) []*upload {
	last := int((size - 1) / cowformat.ClusterSize)
	var ups []*upload
	for i := 0; i < 30; i++ {
		density := []float64{0.02, 0.3, 1}[rng.IntN(3)]
		ups = append(ups, randomUpload(rng, rng.IntN(last+4), density))
	}
	// Cluster 3: all 320 blocks, then only a few: the cleared blocks must
	// come from the original again.
	ups = append(ups, randomUpload(rng, 3, 1), randomUpload(rng, 3, 0.03))
	// Cluster 5: some blocks, then nothing at all.
	ups = append(ups, randomUpload(rng, 5, 0.5), &upload{cluster: 5})
	// The unaligned last cluster, everywhere (blocks past the original's end).
	ups = append(ups, randomUpload(rng, last, 1))
	// Two clusters past the end of the original.
	ups = append(ups, randomUpload(rng, last+2, 0.1), randomUpload(rng, last+6, 0.5))
	// The first block of the image, rewritten three times.
	for i := 0; i < 3; i++ {
		u := &upload{cluster: 0}
		u.blocks[0] = randBytes(rng, cowformat.BlockSize)
		u.blocks[319] = randBytes(rng, cowformat.BlockSize)
		ups = append(ups, u)
	}
	return ups
}

func TestMergeEndToEnd(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(1, 2))
	original := randBytes(rng, 20<<20+1234)
	size := int64(len(original))
	uploads := testUploads(rng, size)
	m := e.manager(nil)

	cases := []struct {
		name                      string
		originalFileSize, newSize int64
	}{
		{"same", size, size},
		{"grow", roundUp(size, cowformat.BlockSize), size + 5<<20 + 77},
		{"shrink", 10<<20 + 5000, 12<<20 + 100},
		{"cut", size, 7<<20 + 1},
		{"from-nothing", 0, 3 << 20},
		{"aligned-up", roundUp(size, cowformat.BlockSize), roundUp(size, cowformat.BlockSize)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := "img-" + tc.name
			e.original(name, 1, original)
			info, err := m.Create(name, 1, cowformat.BitfieldSize)
			if err != nil {
				t.Fatal(err)
			}
			if info.State != StateActive || info.NewRevision != -1 || info.OriginalRevision != 1 || len(info.UUID) != 36 {
				t.Fatalf("created: %+v", info)
			}
			distinct := make(map[int]bool)
			for i, u := range uploads {
				mustUpdate(t, m, info.UUID, u, i%3 == 0)
				distinct[u.cluster] = true
			}
			if st, _ := m.Status(info.UUID); st.TotalClusters != len(distinct) {
				t.Fatalf("TotalClusters %d, want %d", st.TotalClusters, len(distinct))
			}
			mi, err := m.Merge(info.UUID, tc.originalFileSize, tc.newSize)
			if err != nil {
				t.Fatal(err)
			}
			if mi.NewRevision != 2 || (mi.State != StateCopying && mi.State != StateMerging && mi.State != StateDone) {
				t.Fatalf("merge accepted: %+v", mi)
			}
			done := waitFinished(t, m, info.UUID)
			if done.State != StateDone {
				t.Fatalf("merge failed: %s", done.Error)
			}
			out := filepath.Join(e.dest, name+".r2")
			if done.Output != out || done.NewRevision != 2 || done.MergedClusters != len(distinct) || done.TotalClusters != len(distinct) ||
				done.OriginalFileSize != tc.originalFileSize || done.NewFileSize != tc.newSize {
				t.Fatalf("done: %+v", done)
			}
			want := expectedImage(original, uploads, tc.originalFileSize, tc.newSize)
			sameBytes(t, "merged image", e.destFile(name+".r2"), want)
			if tc.newSize > 0 {
				checkCRCFile(t, e, name+".r2")
			}
			// The uploads are gone, the state stays for Status.
			dir := filepath.Join(e.work, info.UUID)
			for _, f := range []string{dataFileName, journalFileName} {
				if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s still there after the merge: %v", f, err)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, sessionFileName)); err != nil {
				t.Error(err)
			}
			if _, err := os.Stat(filepath.Join(e.dest, name+".r3")); !errors.Is(err, fs.ErrNotExist) {
				t.Error("a revision 3 appeared")
			}
		})
	}
	e.noTempFiles()
}

func TestMergeNameWithDirectories(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(3, 4))
	original := randBytes(rng, 3*cowformat.ClusterSize+100)
	e.original("pool/sub/win10", 7, original)
	m := e.manager(nil)
	info, err := m.Create("pool/sub/win10", 7, cowformat.BitfieldSize)
	if err != nil {
		t.Fatal(err)
	}
	u := randomUpload(rng, 1, 0.5)
	mustUpdate(t, m, info.UUID, u, false)
	if done := mergeDone(t, m, info.UUID, int64(len(original)), int64(len(original))); done.NewRevision != 8 {
		t.Fatalf("%+v", done)
	}
	want := expectedImage(original, []*upload{u}, int64(len(original)), int64(len(original)))
	sameBytes(t, "merged", e.destFile("pool/sub/win10.r8"), want)
}

func TestMergeIdempotent(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(5, 6))
	original := randBytes(rng, 4<<20)
	e.original("idem", 1, original)
	var (
		mu      sync.Mutex
		copies  int
		release = make(chan struct{})
	)
	m := e.manager(func(m *Manager) {
		m.hook = func(point, _ string) error {
			if point == hookCopied {
				mu.Lock()
				copies++
				mu.Unlock()
				<-release
			}
			return nil
		}
	})
	info, _ := m.Create("idem", 1, cowformat.BitfieldSize)
	ups := []*upload{randomUpload(rng, 0, 0.5), randomUpload(rng, 2, 1)}
	for _, u := range ups {
		mustUpdate(t, m, info.UUID, u, false)
	}
	size := int64(len(original))
	first, err := m.Merge(info.UUID, size, size)
	if err != nil {
		t.Fatal(err)
	}
	// The client repeats the request while the merge runs.
	for i := 0; i < 3; i++ {
		again, err := m.Merge(info.UUID, size, size)
		if err != nil {
			t.Fatal(err)
		}
		if again.State != StateCopying && again.State != StateMerging {
			t.Fatalf("repeated merge: %+v", again)
		}
	}
	if first.State != StateCopying {
		t.Fatalf("first merge: %+v", first)
	}
	if err := m.Update(info.UUID, ups[0].update(false)); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("upload while merging: %v, want ErrSessionClosed", err)
	}
	close(release)
	if done := waitFinished(t, m, info.UUID); done.State != StateDone {
		t.Fatal(done.Error)
	}
	after, err := m.Merge(info.UUID, size, size)
	if err != nil || after.State != StateDone || after.Output == "" {
		t.Fatalf("merge after done: %+v, %v", after, err)
	}
	mu.Lock()
	n := copies
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d merges ran, want 1", n)
	}
	sameBytes(t, "merged", e.destFile("idem.r2"), expectedImage(original, ups, size, size))
	if top, err := m.TopModified(info.UUID, 10); err != nil || top != nil {
		t.Fatalf("TopModified of a done session: %v, %v", top, err)
	}
}

func TestMergeRetryAfterFailure(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(7, 8))
	original := randBytes(rng, 6<<20+4096)
	e.original("retry", 1, original)
	fail := true
	var mu sync.Mutex
	m := e.manager(func(m *Manager) {
		m.hook = func(point, _ string) error {
			mu.Lock()
			defer mu.Unlock()
			if point == hookApplying && fail {
				fail = false
				return errors.New("injected I/O error")
			}
			return nil
		}
	})
	info, _ := m.Create("retry", 1, cowformat.BitfieldSize)
	var ups []*upload
	for c := 0; c < 5; c++ {
		u := randomUpload(rng, c, 0.4)
		ups = append(ups, u)
		mustUpdate(t, m, info.UUID, u, false)
	}
	size := int64(len(original))
	if _, err := m.Merge(info.UUID, size, size); err != nil {
		t.Fatal(err)
	}
	failed := waitFinished(t, m, info.UUID)
	if failed.State != StateFailed || !strings.Contains(failed.Error, "injected I/O error") {
		t.Fatalf("%+v", failed)
	}
	if e.destFile("retry.r2") != nil {
		t.Fatal("a failed merge left its output")
	}
	e.noTempFiles()
	if err := m.Update(info.UUID, ups[0].update(false)); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("upload to a failed session: %v", err)
	}
	// The session's uploads survive the failure and a restart; a new
	// request merges it.
	m.Close()
	m = e.manager(nil)
	if st, _ := m.Status(info.UUID); st.State != StateFailed {
		t.Fatalf("after restart: %+v", st)
	}
	if done := mergeDone(t, m, info.UUID, size, size); done.Error != "" {
		t.Fatalf("%+v", done)
	}
	sameBytes(t, "merged", e.destFile("retry.r2"), expectedImage(original, ups, size, size))
}

func TestMergeConflict(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(9, 10))
	original := randBytes(rng, 5<<20)
	size := int64(len(original))
	e.original("img", 1, original)
	m := e.manager(nil)
	a, _ := m.Create("img", 1, cowformat.BitfieldSize)
	b, _ := m.Create("img", 1, cowformat.BitfieldSize)
	ua, ub := randomUpload(rng, 1, 0.5), randomUpload(rng, 1, 0.5)
	mustUpdate(t, m, a.UUID, ua, false)
	mustUpdate(t, m, b.UUID, ub, false)
	mergeDone(t, m, a.UUID, size, size)
	r2 := expectedImage(original, []*upload{ua}, size, size)
	sameBytes(t, "r2", e.destFile("img.r2"), r2)

	wantMsg := "revision 2 of img already exists; this session was based on revision 1 and its changes were not merged; start a new session from the latest revision"
	for i := 0; i < 2; i++ { // and again: still a conflict, never a retry
		info, err := m.Merge(b.UUID, size, size)
		if !errors.Is(err, ErrConflict) || err.Error() != "merger: conflict: "+wantMsg { // once "conflict: ", also when repeated
			t.Fatalf("second session's merge: %v", err)
		}
		if info.State != StateFailed || !strings.Contains(info.Error, wantMsg) {
			t.Fatalf("second session: %+v", info)
		}
	}
	if st, _ := m.Status(b.UUID); st.State != StateFailed || st.NewRevision != 2 {
		t.Fatalf("%+v", st)
	}
	sameBytes(t, "r2 after the conflict", e.destFile("img.r2"), r2)
	if e.destFile("img.r3") != nil {
		t.Fatal("the conflicting session became revision 3")
	}
}

// TestMergeConflictAtRename: the revision appears while the merge runs
// (another merger, or an administrator); the no-replace rename catches it.
func TestMergeConflictAtRename(t *testing.T) {
	e := newEnv(t)
	rng := rand.New(rand.NewPCG(11, 12))
	original := randBytes(rng, 2<<20)
	size := int64(len(original))
	e.original("race", 4, original)
	planted := []byte("someone else's revision 5")
	m := e.manager(func(m *Manager) {
		m.hook = func(point, _ string) error {
			if point == hookFinalizing {
				return os.WriteFile(filepath.Join(e.dest, "race.r5"), planted, 0o644)
			}
			return nil
		}
	})
	info, _ := m.Create("race", 4, cowformat.BitfieldSize)
	mustUpdate(t, m, info.UUID, randomUpload(rng, 0, 1), true)
	if _, err := m.Merge(info.UUID, size, size); err != nil {
		t.Fatal(err)
	}
	st := waitFinished(t, m, info.UUID)
	if st.State != StateFailed || !strings.Contains(st.Error, "revision 5 of race already exists") {
		t.Fatalf("%+v", st)
	}
	if got := e.destFile("race.r5"); string(got) != string(planted) {
		t.Fatalf("the existing revision was changed: %q", got)
	}
	if e.destFile("race.r5.crc") != nil {
		t.Fatal("the losing merge put its CRC list beside the existing revision")
	}
	if _, err := m.Merge(info.UUID, size, size); !errors.Is(err, ErrConflict) {
		t.Fatalf("merge after conflict: %v", err)
	}
	e.noTempFiles()
}

// TestCrashMidMerge stops a merge at each crash point as if the process
// had died there, then starts a new Manager: no partial revision is ever
// visible, and recovery produces the correct one.
func TestCrashMidMerge(t *testing.T) {
	for _, point := range []string{hookCopied, hookApplying, hookSynced, hookFinalizing, hookRenamed} {
		t.Run(point, func(t *testing.T) {
			e := newEnv(t)
			rng := rand.New(rand.NewPCG(13, uint64(len(point))))
			original := randBytes(rng, 8<<20+333)
			size := int64(len(original))
			e.original("crash", 1, original)
			configure, crashed := crashAt(point)
			m1 := e.manager(configure)
			info, _ := m1.Create("crash", 1, cowformat.BitfieldSize)
			ups := testUploads(rng, size)
			for i, u := range ups {
				mustUpdate(t, m1, info.UUID, u, i%2 == 0)
			}
			newSize := size + 3<<20
			if _, err := m1.Merge(info.UUID, size, newSize); err != nil {
				t.Fatal(err)
			}
			<-crashed
			m1.Close()
			want := expectedImage(original, ups, size, newSize)
			got := e.destFile("crash.r2")
			if point == hookRenamed {
				sameBytes(t, "revision visible after the crash", got, want)
			} else if got != nil {
				t.Fatalf("a revision is visible after a crash at %q (%d bytes)", point, len(got))
			}

			m2 := e.manager(nil)
			done := waitFinished(t, m2, info.UUID)
			if done.State != StateDone {
				t.Fatalf("after recovery: %+v", done)
			}
			sameBytes(t, "recovered revision", e.destFile("crash.r2"), want)
			checkCRCFile(t, e, "crash.r2")
			e.noTempFiles()
			if _, err := os.Stat(filepath.Join(e.work, info.UUID, journalFileName)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("journal left after recovery: %v", err)
			}
			// A third start finds nothing to do.
			m2.Close()
			m3 := e.manager(nil)
			if st, _ := m3.Status(info.UUID); st.State != StateDone || st.Output == "" {
				t.Fatalf("%+v", st)
			}
		})
	}
}

// TestCrashMidMergeCrossFS does the same with the destination on another
// file system (/dev/shm), where the temporary file is a hidden file
// beside the destination.
func TestCrashMidMergeCrossFS(t *testing.T) {
	shm := crossFSDir(t)
	for _, point := range []string{hookApplying, hookFinalizing, ""} {
		t.Run("crash-at-"+point, func(t *testing.T) {
			e := newEnv(t)
			e.dest = shm(t)
			e.cfg.DestinationDirectory = e.dest
			rng := rand.New(rand.NewPCG(15, 16))
			original := randBytes(rng, 3<<20+5)
			size := int64(len(original))
			e.original("dir/x", 1, original)
			crashed := make(chan struct{})
			m1 := e.manager(func(m *Manager) {
				m.hook = func(p, _ string) error {
					if p == hookSynced {
						// the temporary file lives beside the destination
						matches, _ := filepath.Glob(filepath.Join(e.dest, "dir", ".x.r2.*.merging"))
						if len(matches) != 1 {
							t.Errorf("temporary files in the destination: %v", matches)
						}
					}
					if p == point {
						close(crashed)
						return errSimulatedCrash
					}
					return nil
				}
			})
			info, _ := m1.Create("dir/x", 1, cowformat.BitfieldSize)
			ups := testUploads(rng, size)
			for _, u := range ups {
				mustUpdate(t, m1, info.UUID, u, false)
			}
			if _, err := m1.Merge(info.UUID, size, size); err != nil {
				t.Fatal(err)
			}
			m := m1
			if point != "" {
				<-crashed
				m1.Close()
				if e.destFile("dir/x.r2") != nil {
					t.Fatal("partial revision visible")
				}
				m = e.manager(nil)
			}
			if st := waitFinished(t, m, info.UUID); st.State != StateDone {
				t.Fatalf("%+v", st)
			}
			sameBytes(t, "merged", e.destFile("dir/x.r2"), expectedImage(original, ups, size, size))
			checkCRCFile(t, e, "dir/x.r2")
			e.noTempFiles()
		})
	}
}

// crossFSDir returns a function making directories on a file system
// other than the test's temporary directory, or skips.
func crossFSDir(t *testing.T) func(*testing.T) string {
	t.Helper()
	a, err1 := deviceOf(t.TempDir())
	b, err2 := deviceOf("/dev/shm")
	if err1 != nil || err2 != nil || a == b {
		t.Skip("no second file system (/dev/shm) to test with")
	}
	return func(t *testing.T) string {
		d, err := os.MkdirTemp("/dev/shm", "merger-test-")
		if err != nil {
			t.Skip(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
}

// TestCopyMethods: every copy method produces the same revision, for a
// whole and for a partial copy, and keeps the original's holes.
func TestCopyMethods(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	// A sparse original: data, a 4 MiB hole, data, a hole at the end.
	size := int64(12<<20 + 777)
	original := make([]byte, size)
	copy(original, randBytes(rng, 3<<20))
	copy(original[7<<20:], randBytes(rng, 2<<20+5))
	ups := testUploads(rng, size)
	results := make(map[string][]byte)
	for _, method := range []CopyMethod{CopyAuto, CopyRange, CopyStream, CopyClone} {
		for _, sizes := range [][2]int64{{size, size}, {5<<20 + 3, size + 1<<20}} {
			label := string(method)
			if method == CopyAuto {
				label = "auto"
			}
			t.Run(fmt.Sprintf("%s/%d", label, sizes[0]), func(t *testing.T) {
				e := newEnv(t)
				e.cfg.CopyMethod = method
				p := filepath.Join(e.orig, "sparse.r1")
				writeSparse(t, p, original)
				m := e.manager(nil)
				info, _ := m.Create("sparse", 1, cowformat.BitfieldSize)
				for _, u := range ups {
					mustUpdate(t, m, info.UUID, u, false)
				}
				if _, err := m.Merge(info.UUID, sizes[0], sizes[1]); err != nil {
					t.Fatal(err)
				}
				st := waitFinished(t, m, info.UUID)
				if method == CopyClone && st.State == StateFailed {
					if !strings.Contains(st.Error, "FICLONE") {
						t.Fatalf("clone failure not explained: %s", st.Error)
					}
					t.Skipf("no reflinks here: %s", st.Error)
				}
				if st.State != StateDone {
					t.Fatal(st.Error)
				}
				got := e.destFile("sparse.r2")
				sameBytes(t, "merged", got, expectedImage(original, ups, sizes[0], sizes[1]))
				key := fmt.Sprint(sizes)
				if prev, ok := results[key]; ok {
					sameBytes(t, "same as the other methods", got, prev)
				}
				results[key] = got
			})
		}
	}
}

// writeSparse writes content to path, leaving all-zero 64 KiB pieces as
// holes.
func writeSparse(t *testing.T, path string, content []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(content))); err != nil {
		t.Fatal(err)
	}
	const piece = 64 << 10
	for off := 0; off < len(content); off += piece {
		p := content[off:min(off+piece, len(content))]
		if slices.ContainsFunc(p, func(b byte) bool { return b != 0 }) {
			if _, err := f.WriteAt(p, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestCopyOriginal checks the copy paths directly: which one the
// automatic choice takes, identical bytes, and holes kept as holes.
func TestCopyOriginal(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(19, 20))
	size := int64(16 << 20)
	content := make([]byte, size)
	copy(content[1<<20:], randBytes(rng, 1<<20))
	copy(content[10<<20:], randBytes(rng, 3<<20))
	srcPath := filepath.Join(dir, "src")
	writeSparse(t, srcPath, content)
	src, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for _, method := range []CopyMethod{CopyAuto, CopyRange, CopyStream} {
		for _, n := range []int64{size, 11<<20 + 5} {
			dst, err := os.Create(filepath.Join(dir, fmt.Sprintf("dst-%s-%d", method, n)))
			if err != nil {
				t.Fatal(err)
			}
			used, err := copyOriginal(t.Context(), dst, src, n, n == size, method)
			if err != nil {
				t.Fatalf("%s: %v", method, err)
			}
			switch {
			case method == CopyAuto && used != CopyClone && used != CopyRange:
				t.Errorf("automatic copy used %s; want clone or copy_file_range on one file system", used)
			case method != CopyAuto && used != method:
				t.Errorf("forced %s, used %s", method, used)
			}
			got, _ := os.ReadFile(dst.Name())
			sameBytes(t, string(method), got, content[:n])
			if a := allocated(t, dst.Name()); used != CopyClone && a > 6<<20 {
				t.Errorf("%s: copy allocates %d bytes for 4 MiB of data: holes were filled", method, a)
			}
			dst.Close()
		}
	}
}

// TestRecoverFinalizeVariants: a crash right before the final rename,
// then the temporary file vanished (redo the merge) or someone else's
// revision appeared (conflict, the file untouched).
func TestRecoverFinalizeVariants(t *testing.T) {
	for _, variant := range []string{"temp-lost", "dest-appeared"} {
		t.Run(variant, func(t *testing.T) {
			e := newEnv(t)
			rng := rand.New(rand.NewPCG(33, 34))
			original := randBytes(rng, 3<<20)
			size := int64(len(original))
			e.original("fin", 1, original)
			configure, crashed := crashAt(hookFinalizing)
			m1 := e.manager(configure)
			info, _ := m1.Create("fin", 1, cowformat.BitfieldSize)
			ups := testUploads(rng, size)
			for _, u := range ups {
				mustUpdate(t, m1, info.UUID, u, false)
			}
			m1.Merge(info.UUID, size, size)
			<-crashed
			m1.Close()
			planted := []byte("not ours")
			switch variant {
			case "temp-lost":
				if err := os.Remove(filepath.Join(e.work, info.UUID, mergeTempName)); err != nil {
					t.Fatal(err)
				}
			case "dest-appeared":
				os.WriteFile(filepath.Join(e.dest, "fin.r2"), planted, 0o644)
			}
			m2 := e.manager(nil)
			st := waitFinished(t, m2, info.UUID)
			switch variant {
			case "temp-lost":
				if st.State != StateDone {
					t.Fatalf("%+v", st)
				}
				sameBytes(t, "redone", e.destFile("fin.r2"), expectedImage(original, ups, size, size))
			case "dest-appeared":
				if st.State != StateFailed || !strings.Contains(st.Error, "revision 2 of fin already exists") {
					t.Fatalf("%+v", st)
				}
				if string(e.destFile("fin.r2")) != string(planted) {
					t.Fatal("the existing revision was replaced")
				}
			}
			e.noTempFiles()
		})
	}
}
