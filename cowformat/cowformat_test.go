package cowformat

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// The derived sizes are the numbers the format description gives
// (spec/cow-format.md, section 3).
func TestGeometryMatchesTheSpec(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want int64
	}{
		{"ClusterSize", ClusterSize, 1_310_720},
		{"L2Span", L2Span, 1_342_177_280},
		{"L1Entries", L1Entries, 746},
		{"StartL2", StartL2, 65536},
		{"MetaSize", MetaSize, 48_955_392},
		{"L2TableSize", L2TableSize, 65536},
		{"MaxClusters", MaxClusters, 762_940},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// A meta file written by the reference client has its fields at these
// offsets (../shared/testdata has one).
func TestHeaderOffsetsReadTheReferenceSession(t *testing.T) {
	matches, _ := filepath.Glob("../../shared/testdata/*/meta")
	more, _ := filepath.Glob("../../shared/testdata/*/*/meta")
	matches = append(matches, more...)
	if len(matches) == 0 {
		t.Skip("SKIP: no reference COW session in ../shared/testdata")
	}
	f, err := os.Open(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, HeaderSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if le.Uint64(b[OffMagic:]) != MetaMagic || le.Uint32(b[OffVersion:]) != Version ||
		le.Uint32(b[OffStartL1:]) != StartL1 || le.Uint32(b[OffStartL2:]) != StartL2 ||
		le.Uint32(b[OffBitfieldSize:]) != BitfieldSize || le.Uint64(b[OffMetaSize:]) != MetaSize ||
		le.Uint64(b[OffMaxImageSize:]) != MaxImageSize {
		t.Fatalf("%s: header fields not where the format puts them: % x", matches[0], b[:OffCreationTime])
	}
	if next := le.Uint64(b[OffNextClusterOffset:]); next < FirstSlot || next%ClusterSize != 0 {
		t.Fatalf("nextClusterOffset %d", next)
	}
}
