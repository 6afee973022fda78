package upload

import "strings"

// formField is one name=value pair of an urlencoded form.
type formField struct{ name, value string }

// encodeForm builds an application/x-www-form-urlencoded body with the
// fields in the given order (url.Values would sort them). Values are
// escaped like curl_easy_escape, which the reference client uses: every
// byte except ASCII letters, digits and "-._~" becomes %XX, so a space is
// %20, not "+". Servers decode both the same way.
func encodeForm(fields ...formField) string {
	var b strings.Builder
	for i, f := range fields {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(f.name)
		b.WriteByte('=')
		b.WriteString(escape(f.value))
	}
	return b.String()
}

// escape percent-encodes s, keeping only RFC 3986 unreserved characters.
func escape(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '.', c == '_', c == '~':
			b.WriteByte(c)
		default:
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}
