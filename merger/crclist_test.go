package merger

import (
	"bytes"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/protocol"
	"github.com/dnbd3go/dnbd3go/server"
)

const hashBlock = protocol.HashBlockSize

// wantCRCFile returns what `dnbd3-server --crc` writes for content: the
// command's own code (server.WriteCRCFile) on a copy.
func wantCRCFile(t *testing.T, content []byte) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.r1")
	if err := os.WriteFile(p, content, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := server.WriteCRCFile(p); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p + ".crc")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkCRCFile fails unless <dest>/<name>.crc is the list of the merged
// image <dest>/<name>.
func checkCRCFile(t *testing.T, e *env, name string) {
	t.Helper()
	img := e.destFile(name)
	if img == nil {
		t.Fatalf("%s does not exist", name)
	}
	got := e.destFile(name + ".crc")
	if got == nil {
		t.Fatalf("%s.crc does not exist beside the merged revision", name)
	}
	if want := wantCRCFile(t, img); !bytes.Equal(got, want) {
		t.Fatalf("%s.crc (%d bytes) differs from what dnbd3-server --crc computes for the result (%d bytes)", name, len(got), len(want))
	}
}

// crcUploads changes hash blocks 0 and 2 of an image and leaves block 1
// alone.
func crcUploads(rng *rand.Rand) []*upload {
	var ups []*upload
	for _, off := range []int64{5 << 20, 2*hashBlock + 7<<20} {
		ups = append(ups, randomUpload(rng, int(off/cowformat.ClusterSize), 0.3))
	}
	return ups
}

// TestMergeWritesCRCList: every merged revision gets the CRC list that
// `dnbd3-server --crc` computes for it, whether the original has a list
// (used for the blocks the merge did not touch), has none, has one that
// does not match it, or a stale list of a removed revision lies at the
// destination; for growing, cut and shrunk-then-grown results and an
// unaligned original.
func TestMergeWritesCRCList(t *testing.T) {
	rng := rand.New(rand.NewPCG(41, 42))
	original := randBytes(rng, 3*hashBlock+12345) // 4 hash blocks, the last one short
	size := int64(len(original))
	ups := crcUploads(rng)
	origCRC := wantCRCFile(t, original)
	bogus := func() []byte { // a valid list of other data
		list, _ := protocol.ParseCRCList(origCRC)
		for i := range list {
			list[i] ^= 0x5a5a
		}
		return protocol.MarshalCRCList(list)
	}()
	e := newEnv(t)
	m := e.manager(nil)
	sizes := []struct {
		name                      string
		originalFileSize, newSize int64
	}{
		{"same", size, size},
		{"padded", roundUp(size, cowformat.BlockSize), roundUp(size, cowformat.BlockSize)},
		{"grow", size, size + 2*hashBlock + 4097},
		{"cut", size, hashBlock + 5000},
		{"shrink-grow", hashBlock + 5000, size},
	}
	for _, list := range []string{"old-list", "no-list", "bogus-list", "stale-dest-list"} {
		for _, sz := range sizes {
			t.Run(list+"/"+sz.name, func(t *testing.T) {
				name := "c-" + list + "-" + sz.name
				e.original(name, 1, original)
				switch list {
				case "old-list", "stale-dest-list":
					os.WriteFile(filepath.Join(e.orig, name+".r1.crc"), origCRC, 0o644)
				case "bogus-list":
					os.WriteFile(filepath.Join(e.orig, name+".r1.crc"), bogus, 0o644)
				}
				if list == "stale-dest-list" {
					os.WriteFile(filepath.Join(e.dest, name+".r2.crc"), bogus, 0o644)
				}
				info, err := m.Create(name, 1, cowformat.BitfieldSize)
				if err != nil {
					t.Fatal(err)
				}
				for _, u := range ups {
					mustUpdate(t, m, info.UUID, u, false)
				}
				mergeDone(t, m, info.UUID, sz.originalFileSize, sz.newSize)
				sameBytes(t, "merged", e.destFile(name+".r2"), expectedImage(original, ups, sz.originalFileSize, sz.newSize))
				checkCRCFile(t, e, name+".r2")
			})
		}
	}
	e.noTempFiles()
}

// TestMergeEmptyResultHasNoCRCList: a merge to 0 bytes writes no list
// (an empty image has no hash block; servers ignore empty files).
func TestMergeEmptyResultHasNoCRCList(t *testing.T) {
	e := newEnv(t)
	e.original("empty", 1, []byte("x"))
	m := e.manager(nil)
	info, _ := m.Create("empty", 1, cowformat.BitfieldSize)
	mergeDone(t, m, info.UUID, 0, 0)
	if _, err := os.Stat(filepath.Join(e.dest, "empty.r2.crc")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("empty.r2.crc: %v, want none", err)
	}
}

// TestBuildCRCListComputesOnlyTouched: with the original's list, only
// the hash blocks the merge wrote are computed (plus one spot check of a
// taken block); a list that does not describe the original is caught by
// the spot check and everything is computed.
func TestBuildCRCListComputesOnlyTouched(t *testing.T) {
	rng := rand.New(rand.NewPCG(43, 44))
	old := randBytes(rng, 4*hashBlock+8192)
	oldList, _ := protocol.ComputeCRCList(bytes.NewReader(old), int64(len(old)))
	result := bytes.Clone(old)
	copy(result[hashBlock+100:], randBytes(rng, 5000)) // block 1
	copy(result[3*hashBlock-10:], randBytes(rng, 20))  // blocks 2 and 3
	f := filepath.Join(t.TempDir(), "r")
	os.WriteFile(f, result, 0o644)
	want, _ := protocol.ComputeCRCList(bytes.NewReader(result), int64(len(result)))
	sources := func() *crcSources {
		c := newCRCSources(int64(len(old)), int64(len(old)), int64(len(result)))
		c.touch(hashBlock+100, 5000)
		c.touch(3*hashBlock-10, 20)
		return c
	}
	build := func(old []uint32, spot int) ([]uint32, crcStats) {
		t.Helper()
		r, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		list, st, err := buildCRCList(r, sources(), old, func(int) int { return spot })
		if err != nil {
			t.Fatal(err)
		}
		return list, st
	}
	for spot := range 2 {
		list, st := build(oldList, spot)
		if !equalLists(list, want) || st.computed != 3 || st.taken != 2 || !st.oldList {
			t.Fatalf("with the original's list (spot %d): computed %d, taken %d, right %v; want 3 computed (blocks 1-3), 2 taken (0, 4)",
				spot, st.computed, st.taken, equalLists(list, want))
		}
	}
	wrong := append([]uint32(nil), oldList...)
	wrong[4] ^= 1 // the list of some other file
	list, st := build(wrong, 1)
	if !equalLists(list, want) || st.computed != 5 || st.oldList {
		t.Fatalf("with a list that does not match the original: computed %d (old list used %v), right %v; want all 5 computed",
			st.computed, st.oldList, equalLists(list, want))
	}
	list, st = build(nil, 0)
	if !equalLists(list, want) || st.computed != 5 {
		t.Fatalf("without a list: computed %d, right %v", st.computed, equalLists(list, want))
	}
}

func equalLists(a, b []uint32) bool {
	return bytes.Equal(protocol.MarshalCRCList(a), protocol.MarshalCRCList(b))
}

// TestCRCSourcesFromOriginal: which hash blocks keep the original's
// bytes, for the cuts and padding the sizes make.
func TestCRCSourcesFromOriginal(t *testing.T) {
	const hb = hashBlock
	cases := []struct {
		name                               string
		srcSize, originalFileSize, newSize int64
		want                               []bool
	}{
		{"same", 3 * hb, 3 * hb, 3 * hb, []bool{true, true, true}},
		{"unaligned, padded sizes", 2*hb + 10, 2*hb + 4096, 2*hb + 4096, []bool{true, true, true}},
		{"unaligned, exact sizes", 2*hb + 10, 2*hb + 10, 2*hb + 10, []bool{true, true, true}},
		{"grow", 2*hb + 10, 2*hb + 10, 4 * hb, []bool{true, true, false, false}},
		{"cut inside block 1", 3 * hb, 3 * hb, hb + 5000, []bool{true, false}},
		{"cut at a block end", 3 * hb, 3 * hb, 2 * hb, []bool{true, true}},
		{"original cut, same size", 3 * hb, hb + 5000, 3 * hb, []bool{true, false, false}},
		{"grown from 4 KiB", 4096, 4096, hb + 1, []bool{false, false}},
	}
	for _, c := range cases {
		s := newCRCSources(c.srcSize, c.originalFileSize, c.newSize)
		var got []bool
		for i := range s.touched {
			got = append(got, s.fromOriginal(i))
		}
		if len(got) != len(c.want) {
			t.Fatalf("%s: %d hash blocks, want %d", c.name, len(got), len(c.want))
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: fromOriginal = %v, want %v", c.name, got, c.want)
				break
			}
		}
	}
	s := newCRCSources(3*hb, 3*hb, 3*hb)
	s.touch(hb-1, 2) // the last byte of block 0 and the first of block 1
	s.touch(3*hb, 4096)
	if s.fromOriginal(0) || s.fromOriginal(1) || !s.fromOriginal(2) {
		t.Errorf("after writes across the 0/1 boundary and past the end: %v", s.touched)
	}
}

// TestCrashBetweenRenames: the crash points around the two renames that
// install a revision (its CRC list, then the image), with the list or
// the image lost or someone else's revision appearing meanwhile. After a
// crash no revision is visible without its list, and recovery ends with
// the revision and its correct list, or (conflict) with the other
// revision untouched and no list of ours beside it.
//
// The sequence and the state each crash leaves (a power loss before a
// directory sync undoes the rename it would have made durable, which is
// the state of the point before that rename):
//
//	write the list to <temp>.crc   synced: no list, or a torn one (synced/crc-temp-torn)
//	sync it                        crcwritten
//	persist the finalize record    finalizing (also: temp list lost, a stale <dest>.crc)
//	rename the list, sync the dir  crcplaced (also: list lost, image lost, dest appeared)
//	rename the image               renamed (also: list lost; the link+unlink
//	                               fallback left the temporary name too)
//	sync the dirs, persist Done    renamed
func TestCrashBetweenRenames(t *testing.T) {
	cases := []struct {
		point, variant string
	}{
		{hookSynced, ""},
		{hookSynced, "crc-temp-torn"},
		{hookCRCWritten, ""},
		{hookFinalizing, ""},
		{hookFinalizing, "crc-temp-lost"},
		{hookFinalizing, "stale-crc"},
		{hookCRCPlaced, ""},
		{hookCRCPlaced, "crc-lost"},
		{hookCRCPlaced, "image-temp-lost"},
		{hookCRCPlaced, "dest-appeared"},
		{hookRenamed, ""},
		{hookRenamed, "crc-lost"},
		{hookRenamed, "temp-link-left"},
	}
	for _, c := range cases {
		t.Run(c.point+"/"+c.variant, func(t *testing.T) {
			e := newEnv(t)
			rng := rand.New(rand.NewPCG(45, uint64(len(c.point)+len(c.variant))))
			original := randBytes(rng, 2*hashBlock+777)
			size := int64(len(original))
			e.original("x", 1, original)
			os.WriteFile(filepath.Join(e.orig, "x.r1.crc"), wantCRCFile(t, original), 0o644)
			configure, crashed := crashAt(c.point)
			m1 := e.manager(configure)
			info, _ := m1.Create("x", 1, cowformat.BitfieldSize)
			ups := crcUploads(rng)[:1]
			for _, u := range ups {
				mustUpdate(t, m1, info.UUID, u, false)
			}
			if _, err := m1.Merge(info.UUID, size, size); err != nil {
				t.Fatal(err)
			}
			<-crashed
			m1.Close()
			want := expectedImage(original, ups, size, size)
			img, crc := e.destFile("x.r2"), e.destFile("x.r2.crc")
			switch c.point {
			case hookSynced, hookCRCWritten, hookFinalizing:
				if img != nil || crc != nil {
					t.Fatalf("after a crash at %s (before the renames): image %v, list %v visible", c.point, img != nil, crc != nil)
				}
			case hookCRCPlaced:
				if img != nil || !bytes.Equal(crc, wantCRCFile(t, want)) {
					t.Fatalf("after a crash between the renames: image visible %v, list right %v; want only the list", img != nil, bytes.Equal(crc, wantCRCFile(t, want)))
				}
			case hookRenamed:
				if img == nil || crc == nil {
					t.Fatalf("after a crash after the renames: image %v, list %v", img != nil, crc != nil)
				}
			}
			planted := []byte("someone else's revision 2")
			switch c.variant {
			case "crc-temp-torn":
				os.WriteFile(filepath.Join(e.work, info.UUID, mergeTempName+crcSuffix), wantCRCFile(t, want)[:6], 0o644)
			case "crc-temp-lost":
				mustRemove(t, filepath.Join(e.work, info.UUID, mergeTempName+crcSuffix))
			case "stale-crc":
				os.WriteFile(filepath.Join(e.dest, "x.r2.crc"), wantCRCFile(t, original), 0o644)
			case "temp-link-left":
				if err := os.Link(filepath.Join(e.dest, "x.r2"), filepath.Join(e.work, info.UUID, mergeTempName)); err != nil {
					t.Fatal(err)
				}
			case "crc-lost":
				mustRemove(t, filepath.Join(e.dest, "x.r2.crc"))
			case "image-temp-lost":
				mustRemove(t, filepath.Join(e.work, info.UUID, mergeTempName))
			case "dest-appeared":
				os.WriteFile(filepath.Join(e.dest, "x.r2"), planted, 0o644)
			}
			m2 := e.manager(nil)
			st := waitFinished(t, m2, info.UUID)
			if c.variant == "dest-appeared" {
				if st.State != StateFailed || !strings.Contains(st.Error, "already exists") {
					t.Fatalf("%+v", st)
				}
				if !bytes.Equal(e.destFile("x.r2"), planted) {
					t.Fatal("the other revision was changed")
				}
				if e.destFile("x.r2.crc") != nil {
					t.Fatal("our CRC list was left beside someone else's revision")
				}
			} else {
				if st.State != StateDone {
					t.Fatalf("after recovery: %+v", st)
				}
				sameBytes(t, "recovered revision", e.destFile("x.r2"), want)
				checkCRCFile(t, e, "x.r2")
			}
			e.noTempFiles()
		})
	}
}

func mustRemove(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentMergesKeepTheWinnersList: two sessions based on the same
// revision merge at the same time; one becomes revision 2, the other
// fails with a conflict, and revision 2's CRC list is the winner's.
func TestConcurrentMergesKeepTheWinnersList(t *testing.T) {
	for round := range 3 {
		e := newEnv(t)
		rng := rand.New(rand.NewPCG(47, uint64(round)))
		original := randBytes(rng, hashBlock+4096)
		size := int64(len(original))
		e.original("race", 1, original)
		m := e.manager(nil)
		a, _ := m.Create("race", 1, cowformat.BitfieldSize)
		b, _ := m.Create("race", 1, cowformat.BitfieldSize)
		ua, ub := randomUpload(rng, 0, 0.5), randomUpload(rng, 0, 0.5)
		mustUpdate(t, m, a.UUID, ua, false)
		mustUpdate(t, m, b.UUID, ub, false)
		m.Merge(a.UUID, size, size)
		m.Merge(b.UUID, size, size)
		sa, sb := waitFinished(t, m, a.UUID), waitFinished(t, m, b.UUID)
		winner := ua
		if sb.State == StateDone {
			winner = ub
		}
		if (sa.State == StateDone) == (sb.State == StateDone) {
			t.Fatalf("round %d: states %s and %s, want one Done and one Failed", round, sa.State, sb.State)
		}
		sameBytes(t, "r2", e.destFile("race.r2"), expectedImage(original, []*upload{winner}, size, size))
		checkCRCFile(t, e, "race.r2")
		e.noTempFiles()
	}
}
