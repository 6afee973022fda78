package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// defaultSettingsFile is read from the working directory when --settings
// is not given, like ASP.NET Core reads appsettings.json.
const defaultSettingsFile = "appsettings.json"

// Setting names as the reference's appsettings.json spells them; errors
// name them so that the user finds the line to fix.
const (
	keyWorkingDirectory       = "Settings.WorkingDirectory"
	keyOriginalImageDirectory = "Settings.OriginalImageDirectory"
	keyDestinationDirectory   = "Settings.DestinationDirectory"
	keyUrls                   = "Urls"
)

// appSettings is the part of the reference's appsettings.json that the
// merger uses. Other keys (Logging, AllowedHosts, ...) are ignored; keys
// match case-insensitively, as in .NET's configuration. Nil means the key
// is absent.
type appSettings struct {
	Settings struct {
		WorkingDirectory       *string
		OriginalImageDirectory *string
		DestinationDirectory   *string
	}
	// Urls is a semicolon-separated list of listen URLs.
	Urls *string
	// Limits is dnbd3go's own section (see limits.go): numbers, sizes
	// and durations by name.
	Limits map[string]json.RawMessage
}

// loadSettings reads an appsettings.json file. Like .NET's JSON
// configuration it allows // and /* */ comments and trailing commas.
func loadSettings(path string) (appSettings, error) {
	var s appSettings
	b, err := os.ReadFile(path)
	if err != nil {
		return s, fmt.Errorf("settings file: %w", err)
	}
	clean := relaxedJSON(b)
	if len(bytes.TrimSpace(clean)) == 0 {
		return s, nil // an empty file is an empty configuration
	}
	if err := json.Unmarshal(clean, &s); err != nil {
		return s, fmt.Errorf("settings file %s: %w (it must be a JSON object like the reference's appsettings.json)", path, err)
	}
	return s, nil
}

// splitList splits a list of URLs separated by semicolons or commas,
// dropping empty entries and surrounding spaces.
func splitList(s string) []string {
	var out []string
	for _, part := range strings.FieldsFunc(s, func(r rune) bool { return r == ';' || r == ',' }) {
		if p := strings.TrimSpace(part); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// relaxedJSON removes comments and trailing commas (outside strings) so
// that encoding/json accepts what .NET's configuration reader accepts.
// Removed characters become spaces, so error offsets stay meaningful.
func relaxedJSON(in []byte) []byte {
	return dropTrailingCommas(dropComments(in))
}

// scanJSON calls fn for every byte of in that is outside a string literal
// (with its index); bytes inside strings are left alone. fn returns the
// index to go on from (i+1 normally, further to skip a comment).
func scanJSON(in []byte, fn func(i int) (next int)) {
	inString, escaped := false, false
	for i := 0; i < len(in); {
		c := in[i]
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			i++
			continue
		}
		if c == '"' {
			inString = true
			i++
			continue
		}
		i = fn(i)
	}
}

// dropComments blanks // and /* */ comments, keeping line breaks.
func dropComments(in []byte) []byte {
	out := bytes.Clone(in)
	scanJSON(in, func(i int) int {
		end := i + 1
		switch {
		case in[i] == '/' && i+1 < len(in) && in[i+1] == '/':
			n := bytes.IndexByte(in[i:], '\n')
			if n < 0 {
				n = len(in) - i
			}
			end = i + n
		case in[i] == '/' && i+1 < len(in) && in[i+1] == '*':
			n := bytes.Index(in[i+2:], []byte("*/"))
			if n < 0 {
				end = len(in)
			} else {
				end = i + 2 + n + 2
			}
		default:
			return end
		}
		for j := i; j < end; j++ {
			if out[j] != '\n' {
				out[j] = ' '
			}
		}
		return end
	})
	return out
}

// dropTrailingCommas blanks a comma that is followed (after white space)
// by a closing brace or bracket.
func dropTrailingCommas(in []byte) []byte {
	out := bytes.Clone(in)
	scanJSON(in, func(i int) int {
		if in[i] != ',' {
			return i + 1
		}
		j := i + 1
		for j < len(in) && (in[j] == ' ' || in[j] == '\t' || in[j] == '\n' || in[j] == '\r') {
			j++
		}
		if j < len(in) && (in[j] == '}' || in[j] == ']') {
			out[i] = ' '
		}
		return i + 1
	})
	return out
}
