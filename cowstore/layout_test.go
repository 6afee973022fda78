package cowstore

import (
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

func TestLayoutConstants(t *testing.T) {
	for name, c := range map[string][2]int64{
		"ClusterSize": {cowformat.ClusterSize, 1_310_720},
		"L2Span":      {cowformat.L2Span, 1_342_177_280},
		"L1Entries":   {cowformat.L1Entries, 746},
		"StartL2":     {cowformat.StartL2, 65536},
		"MetaSize":    {cowformat.MetaSize, 48_955_392},
	} {
		if c[0] != c[1] {
			t.Errorf("%s = %d, want %d", name, c[0], c[1])
		}
	}
}
