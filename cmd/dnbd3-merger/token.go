package main

import (
	"fmt"
	"io"
	"os"
	"strings"
)

// readToken reads the bearer token from a file: its content without
// surrounding white space, one word of printable ASCII. worldReadable
// reports that every user can read the file (the caller warns).
func readToken(path string) (token string, worldReadable bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", false, fmt.Errorf("token file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", false, fmt.Errorf("token file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return "", false, fmt.Errorf("token file %s is not a regular file", path)
	}
	worldReadable = st.Mode().Perm()&0o004 != 0
	b, err := io.ReadAll(io.LimitReader(f, 4097))
	if err != nil {
		return "", worldReadable, fmt.Errorf("token file: %w", err)
	}
	if len(b) > 4096 {
		return "", worldReadable, fmt.Errorf("token file %s is larger than 4 KiB: put only the token in it", path)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", worldReadable, fmt.Errorf("token file %s is empty", path)
	}
	for _, r := range tok {
		if r < 0x21 || r > 0x7e {
			return "", worldReadable, fmt.Errorf("token file %s must hold one token of printable ASCII characters without spaces or line breaks", path)
		}
	}
	return tok, worldReadable, nil
}
