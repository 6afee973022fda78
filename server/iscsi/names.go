package iscsi

import (
	"strconv"
	"strings"
)

// TargetPrefix starts the target names the discovery lists:
// TargetPrefix:NAME:RID. Any prefix works for logins: only the last parts
// of a target name select the image.
const TargetPrefix = "iqn.2025-01.com.github.dnbd3go"

// ImageRef is one reading of a target name: an image by name or by WWN,
// and a revision (0: the latest).
type ImageRef struct {
	Name  string // image name, if not ByWWN
	WWN   uint64 // the image's WWN, if ByWWN
	ByWWN bool
	RID   uint16
}

// ParseTargetName returns the images a target name may select, the
// reference server's reading first. As in the reference, the name is split
// at colons and the last two parts are NAME:RID (`iqn.2024-01.org.example:
// ubuntu:7` and `ubuntu:7` are ubuntu rid 7, `ubuntu:0` is the latest
// ubuntu). A last part that is no rid (0-65535) is ignored by the
// reference (`x:ubuntu:latest` is the latest ubuntu); we then also try
// the last part as the name (`iqn.2024-01.org.example:ubuntu`). A NAME of
// the form wwn-0x<16 hex digits> selects the image by its WWN.
//
// Image names may contain colons, which the reference cannot address: the
// longer suffixes follow as further candidates (`iqn...:a:b:7` also means
// image "a:b" rid 7), so that such names work too.
func ParseTargetName(target string) []ImageRef {
	parts := strings.Split(target, ":")
	var rid uint16
	var names []string
	if n, err := strconv.ParseUint(parts[len(parts)-1], 10, 16); err == nil && len(parts) > 1 {
		rid = uint16(n)
		parts = parts[:len(parts)-1]
	} else if len(parts) > 1 {
		names = append(names, parts[len(parts)-2])
	}
	for i := len(parts) - 1; i >= 0; i-- {
		names = append(names, strings.Join(parts[i:], ":"))
	}
	var refs []ImageRef
	seen := map[string]bool{}
	for _, name := range names {
		if name == "" || seen[name] {
			continue
		}
		seen[name] = true
		if wwn, ok := parseWWN(name); ok {
			refs = append(refs, ImageRef{WWN: wwn, ByWWN: true, RID: rid})
			continue
		}
		refs = append(refs, ImageRef{Name: name, RID: rid})
	}
	return refs
}

// parseWWN parses wwn-0x<16 hex digits> (any letter case).
func parseWWN(s string) (uint64, bool) {
	if len(s) != 22 || !strings.EqualFold(s[:6], "wwn-0x") {
		return 0, false
	}
	n, err := strconv.ParseUint(s[6:], 16, 64)
	return n, err == nil
}

// DiscoveryName returns the target name the discovery lists for an image:
// TargetPrefix:NAME:RID when the name is made of characters every
// initiator takes in a target name (letters, digits, '.', '-', '_'), else
// TargetPrefix:wwn-0x<WWN>:RID. Image names with '/' are the usual case of
// the latter: open-iscsi keeps its node records in directories named after
// the target.
func DiscoveryName(name string, rid uint16, wwn uint64) string {
	id := name
	if !safeName(name) {
		id = formatWWN(wwn)
	}
	return TargetPrefix + ":" + id + ":" + strconv.Itoa(int(rid))
}

// formatWWN returns wwn-0x and the WWN as 16 lower-case hex digits.
func formatWWN(wwn uint64) string {
	const hex = "0123456789abcdef"
	b := []byte("wwn-0x0000000000000000")
	for i := 0; i < 16; i++ {
		b[len(b)-1-i] = hex[wwn>>(4*i)&0xf]
	}
	return string(b)
}

func safeName(name string) bool {
	if name == "" {
		return false
	}
	if _, ok := parseWWN(name); ok {
		return false // would read as a WWN
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}
