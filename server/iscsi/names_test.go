package iscsi

import (
	"reflect"
	"strconv"
	"testing"
)

// Target names read as the reference reads them (the last two parts are
// NAME:RID, no valid rid means the latest, wwn-0x<hex> selects by WWN),
// with longer suffixes as further candidates for names with colons.
func TestParseTargetName(t *testing.T) {
	cases := map[string][]ImageRef{
		"iqn.2024-01.org.example:ubuntu:7": {{Name: "ubuntu", RID: 7}, {Name: "iqn.2024-01.org.example:ubuntu", RID: 7}},
		"ubuntu:7":                         {{Name: "ubuntu", RID: 7}},
		"ubuntu":                           {{Name: "ubuntu"}},
		"ubuntu:0":                         {{Name: "ubuntu"}},
		"iqn.2024-01.org.example:ubuntu":   {{Name: "iqn.2024-01.org.example"}, {Name: "ubuntu"}, {Name: "iqn.2024-01.org.example:ubuntu"}},
		"x:ubuntu:latest":                  {{Name: "ubuntu"}, {Name: "latest"}, {Name: "ubuntu:latest"}, {Name: "x:ubuntu:latest"}},
		"x:ubuntu:70000":                   {{Name: "ubuntu"}, {Name: "70000"}, {Name: "ubuntu:70000"}, {Name: "x:ubuntu:70000"}},
		"wwn-0x2000000347F0E016":           {{WWN: 0x2000000347f0e016, ByWWN: true}},
		"iqn.x:wwn-0x2000000347f0e016:3":   {{WWN: 0x2000000347f0e016, ByWWN: true, RID: 3}, {Name: "iqn.x:wwn-0x2000000347f0e016", RID: 3}},
		"iqn.x:a:b:5":                      {{Name: "b", RID: 5}, {Name: "a:b", RID: 5}, {Name: "iqn.x:a:b", RID: 5}},
		"a::5":                             {{Name: "a:", RID: 5}},
	}
	for in, want := range cases {
		if got := ParseTargetName(in); !reflect.DeepEqual(got, want) {
			t.Errorf("%q: %+v, want %+v", in, got, want)
		}
	}
}

// Discovery names are readable for plain names and WWN-based for names
// an initiator might choke on, and both read back to the image.
func TestDiscoveryName(t *testing.T) {
	cases := []struct {
		name string
		rid  uint16
		want string
	}{
		{"ubuntu-22.04_x", 7, TargetPrefix + ":ubuntu-22.04_x:7"},
		{"sub/dir/img", 2, TargetPrefix + ":wwn-0x21ed1d0347a2c3f4:2"},
		{"a b", 1, TargetPrefix + ":wwn-0x21ed1d0347a2c3f4:1"},
		{"wwn-0x0000000000000001", 1, TargetPrefix + ":wwn-0x21ed1d0347a2c3f4:1"},
	}
	for _, c := range cases {
		got := DiscoveryName(c.name, c.rid, 0x21ed1d0347a2c3f4)
		if got != c.want {
			t.Errorf("%q: %q, want %q", c.name, got, c.want)
		}
		first := ParseTargetName(got)[0]
		if first.RID != c.rid || (first.ByWWN != (c.want != TargetPrefix+":"+c.name+":"+strconv.Itoa(int(c.rid)))) {
			t.Errorf("%q reads back as %+v", got, first)
		}
	}
}
