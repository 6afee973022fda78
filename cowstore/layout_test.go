package cowstore

import "testing"

func TestLayoutConstants(t *testing.T) {
	for name, c := range map[string][2]int64{
		"ClusterSize": {ClusterSize, 1_310_720},
		"L2Span":      {L2Span, 1_342_177_280},
		"L1Entries":   {L1Entries, 746},
		"StartL2":     {StartL2, 65536},
		"MetaSize":    {MetaSize, 48_955_392},
	} {
		if c[0] != c[1] {
			t.Errorf("%s = %d, want %d", name, c[0], c[1])
		}
	}
}
