package server

import "testing"

func TestWWNMatchesReference(t *testing.T) {
	for name, want := range map[string]uint64{
		"test":            2310065147951306774,
		"crctest":         2646709220093671306,
		"cowsrc":          2373397017711584617,
		"bigsrc":          2848808253376182880,
		"sub/dir/odd.img": 2442921336962643415,
	} {
		if got := wwn(name); got != want {
			t.Errorf("WWN(%q) = %d, want %d", name, got, want)
		}
	}
}
