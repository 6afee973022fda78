// Package uuid makes and parses the session ids of the merger API: random
// (version 4) UUIDs in the canonical lowercase 8-4-4-4-12 form.
package uuid

import (
	"crypto/rand"
	"encoding/hex"
)

// New returns a random (version 4) UUID in the canonical lowercase
// 8-4-4-4-12 form, as the reference service's Guid.ToString() writes it.
func New() string {
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return formatUUID(b)
}

func formatUUID(b [16]byte) string {
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// Parse normalises a session id the way ASP.NET's Guid binder
// accepts it: canonical ("D", 8-4-4-4-12), upper or lower case, with or
// without braces ("B") or parentheses ("P"), or as 32 bare hex digits
// ("N"). It returns the canonical lowercase form, or false. Only
// canonical ids are ever used as file names, so a session id can never
// name a path outside WorkingDirectory.
func Parse(s string) (string, bool) {
	if len(s) == 38 && (s[0] == '{' && s[37] == '}' || s[0] == '(' && s[37] == ')') {
		s = s[1:37]
	}
	var hexDigits string
	switch len(s) {
	case 32:
		hexDigits = s
	case 36:
		if s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
			return "", false
		}
		hexDigits = s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	default:
		return "", false
	}
	var b [16]byte
	if _, err := hex.Decode(b[:], []byte(hexDigits)); err != nil { // either case
		return "", false
	}
	return formatUUID(b), true
}
