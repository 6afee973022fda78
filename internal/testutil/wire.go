package testutil

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"os"
	"strings"
	"testing"
)

// WireMsg is one captured protocol message of ../shared/testdata/wire.
type WireMsg struct {
	FromClient bool   // "C>S" (else "S>C")
	Bytes      []byte // header and payload as captured
	Truncated  bool   // GET_BLOCK data cut after 16 bytes
	Comment    string
	Line       int
}

// Size returns the header's size field (request or reply).
func (m WireMsg) Size() int {
	if len(m.Bytes) < 8 {
		return -1
	}
	return int(binary.LittleEndian.Uint32(m.Bytes[4:]))
}

// HeaderLen returns 24 for requests and 16 for replies.
func (m WireMsg) HeaderLen() int {
	if m.FromClient {
		return 24
	}
	return 16
}

// ReadWire parses a capture file: lines "C>S <hex> # comment".
func ReadWire(t testing.TB, name string) []WireMsg {
	t.Helper()
	f, err := os.Open(Testdata(t, "wire", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []WireMsg
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		body, comment, _ := strings.Cut(s, " # ")
		dir, hx, ok := strings.Cut(body, " ")
		if !ok || (dir != "C>S" && dir != "S>C") {
			t.Fatalf("%s:%d: malformed line", name, line)
		}
		b, err := hex.DecodeString(strings.TrimSpace(hx))
		if err != nil {
			t.Fatalf("%s:%d: %v", name, line, err)
		}
		m := WireMsg{FromClient: dir == "C>S", Bytes: b, Comment: comment, Line: line}
		if !m.FromClient && len(b) < m.HeaderLen()+m.Size() && binary.LittleEndian.Uint16(b[2:]) == 1 {
			m.Truncated = true
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// GenByte is the generator rule of every server image in the captured data:
// byte i = (i*7 + 3) mod 251.
func GenByte(i int64) byte { return byte((i*7 + 3) % 251) }

// GenImage returns n bytes of the generator rule starting at offset off.
func GenImage(off, n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = GenByte(off + int64(i))
	}
	return b
}

// WriteGenImage writes a file of n generator bytes.
func WriteGenImage(t testing.TB, path string, n int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := bufio.NewWriterSize(f, 1<<20)
	// The pattern repeats every 251 bytes: write whole periods.
	period := GenImage(0, 251*4096)
	for off := int64(0); off < n; {
		k := min(int64(len(period)), n-off)
		// period starts at offset 0; align by the current offset mod 251
		start := off % 251
		chunk := period[start:]
		if int64(len(chunk)) > k {
			chunk = chunk[:k]
		}
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
		off += int64(len(chunk))
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
}
