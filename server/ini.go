package server

// INI reading compatible with the inih library the reference server uses for
// server.conf and alt-servers, plus the reference's value parsers.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// iniSyntaxError reports a malformed line of an INI file. parseINI still
// delivers every well-formed line, so callers usually log it as a warning.
type iniSyntaxError struct {
	Line int
	Msg  string
}

func (e *iniSyntaxError) Error() string {
	return fmt.Sprintf("line %d: %s", e.Line, e.Msg)
}

// badValue says what is wrong with a value in a configuration file
// (server.conf, alt-servers, rpc.acl). A report prints it after the file,
// line and key it belongs to, so unlike the package's errors it does not
// start with "server:" (see internal/errprefix).
type badValue string

func (e badValue) Error() string { return string(e) }

// badValuef formats a badValue.
func badValuef(format string, a ...any) error { return badValue(fmt.Sprintf(format, a...)) }

// utf8BOM is skipped at the very start of an INI file.
var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// parseINI reads an INI file the way inih does and calls fn for every
// key/value line with the current section (empty before the first section
// header) and the 1-based line number.
//
//   - `[name]`: the section name is the text between the first `[` and the
//     last `]` before any inline comment, so `[[2001:db8::1]:5003]` is
//     section `[2001:db8::1]:5003`. Text after that `]` is ignored.
//   - `key=value` or `key:value`: the first `=` or `:` splits; key and value
//     are trimmed.
//   - Lines starting with `;` or `#` are comments; a `;` preceded by
//     whitespace starts an inline comment.
//   - A UTF-8 byte order mark at the start is skipped.
//
// Unlike inih, lines with leading whitespace are not continuation lines;
// they are parsed like any other line.
//
// Malformed lines are skipped; after the whole input has been read they are
// returned as one *iniSyntaxError per line, joined with errors.Join (so
// errors.As finds the first). A read error is returned at once.
func parseINI(r io.Reader, fn func(section, key, value string, line int)) error {
	br := bufio.NewReader(r)
	var (
		section string
		bad     []error
		lineNo  int
	)
	for {
		raw, readErr := br.ReadBytes('\n')
		if len(raw) == 0 && readErr != nil {
			if errors.Is(readErr, io.EOF) {
				return errors.Join(bad...)
			}
			return readErr
		}
		lineNo++
		if lineNo == 1 {
			raw = bytes.TrimPrefix(raw, utf8BOM)
		}
		line := strings.TrimSpace(string(raw))
		switch {
		case line == "", line[0] == ';', line[0] == '#':
			// blank or comment
		case line[0] == '[':
			if c := inlineComment(line); c >= 0 {
				line = line[:c]
			}
			end := strings.LastIndexByte(line, ']')
			if end < 0 {
				bad = append(bad, &iniSyntaxError{Line: lineNo, Msg: "a section line needs a closing ']'"})
				break
			}
			section = line[1:end]
		default:
			i := keyEnd(line)
			if i < 0 {
				bad = append(bad, &iniSyntaxError{Line: lineNo, Msg: "no '=' or ':' in it (write key=value)"})
				break
			}
			key := strings.TrimSpace(line[:i])
			value := strings.TrimLeft(line[i+1:], " \t\v\f\r")
			if c := inlineComment(value); c >= 0 {
				value = value[:c]
			}
			fn(section, key, strings.TrimSpace(value), lineNo)
		}
		if readErr != nil {
			if errors.Is(readErr, io.EOF) {
				return errors.Join(bad...)
			}
			return readErr
		}
	}
}

// keyEnd returns the index of the first `=` or `:` in line, or -1 if there is
// none before an inline comment.
func keyEnd(line string) int {
	c := inlineComment(line)
	if c >= 0 {
		line = line[:c]
	}
	return strings.IndexAny(line, "=:")
}

// inlineComment returns the index of the first `;` preceded by whitespace,
// or -1.
func inlineComment(s string) int {
	for i := 1; i < len(s); i++ {
		if s[i] == ';' && isINISpace(s[i-1]) {
			return i
		}
	}
	return -1
}

func isINISpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

// parseBool is the reference's boolean: true if the value starts with a
// non-zero integer (C atoi) or is exactly "true", "True" or "TRUE". So "yes"
// and "on" are false.
func parseBool(s string) bool {
	switch s {
	case "true", "True", "TRUE":
		return true
	}
	s = strings.TrimLeft(s, " \t\n\r\v\f")
	if s != "" && (s[0] == '+' || s[0] == '-') {
		s = s[1:]
	}
	for i := 0; i < len(s) && s[i] >= '0' && s[i] <= '9'; i++ {
		if s[i] != '0' {
			return true
		}
	}
	return false
}

// parseNumber parses an integer with the reference's optional suffix:
//
//	K M G T P E Z Y (also k g t p e z y)  ×1024^n
//	the same followed by B or b (KB, kb, MB, …)  ×1000^n
//	m  minutes (×60) — lower-case m is never mega
//	h  hours (×3600)
//	d  days (×86400)
//
// So 9m is 540, 9M is 9437184 and 9MB is 9000000. The number may be negative
// and may be separated from the suffix by blanks. Anything else (including
// "mb", which is ambiguous) and results outside int64 are errors.
func parseNumber(s string) (int64, error) {
	s = strings.TrimSpace(s)
	i := 0
	if i < len(s) && (s[i] == '+' || s[i] == '-') {
		i++
	}
	digits := i
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == digits {
		return 0, badValuef("%q is not a number: write digits with an optional suffix K, M, G, T, P, E (×1024), KB, MB, … (×1000), m, h or d (minutes, hours, days)", s)
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, badValuef("%q is out of range (largest is %d)", s, int64(math.MaxInt64))
	}
	suffix := strings.TrimLeft(s[i:], " \t")
	mul, ok := numberSuffix(suffix)
	if !ok {
		return 0, fmt.Errorf("server: %q has an unknown suffix %q: use K, M, G, T, P, E (×1024), KB, MB, … (×1000), m, h or d (minutes, hours, days)", s, suffix)
	}
	if mul == 0 && n != 0 {
		return 0, badValuef("%q is out of range (largest is %d)", s, int64(math.MaxInt64))
	}
	if n > 0 && n > math.MaxInt64/mul || n < 0 && n < math.MinInt64/mul {
		return 0, badValuef("%q is out of range (largest is %d)", s, int64(math.MaxInt64))
	}
	return n * mul, nil
}

// numberSuffix returns the multiplier of a number suffix; 0 with ok means a
// multiplier that does not fit in int64 (Z, Y).
func numberSuffix(suffix string) (mul int64, ok bool) {
	switch suffix {
	case "":
		return 1, true
	case "m":
		return 60, true
	case "h":
		return 3600, true
	case "d":
		return 86400, true
	}
	exp := strings.IndexByte("KMGTPEZY", suffix[0])
	if exp < 0 && suffix[0] != 'm' {
		// Lower-case letters too, except m (always minutes).
		exp = strings.IndexByte("kmgtpezy", suffix[0])
	}
	if exp < 0 {
		return 0, false
	}
	base := int64(1024)
	switch suffix[1:] {
	case "":
	case "B", "b":
		base = 1000
	default:
		return 0, false
	}
	mul = 1
	for range exp + 1 {
		if mul > math.MaxInt64/base {
			return 0, true
		}
		mul *= base
	}
	return mul, true
}
