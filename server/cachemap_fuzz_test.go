package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzCacheMap loads arbitrary `.map` bytes (a file another server or a
// crash left behind) for an arbitrary image size and checks that every
// query stays consistent and in range; arbitrary `.meta` contents must
// parse or fail without panicking.
func FuzzCacheMap(f *testing.F) {
	f.Add([]byte{0xff, 0x01, 0x80}, uint32(10001), uint32(0), uint32(8192))
	f.Add([]byte{}, uint32(1<<26), uint32(4096), uint32(1<<25))
	f.Add(make([]byte, 600), uint32(16<<20+1), uint32(16<<20), uint32(16<<20+1))
	f.Fuzz(func(t *testing.T, bits []byte, size, a, b uint32) {
		vsize := (int64(size%(1<<28)) + 4096) &^ 4095 // virtual sizes are 4 KiB multiples
		m := newCacheMap(vsize)
		m.replace(bits)
		if m.Present() < 0 || m.Present() > m.Blocks() {
			t.Fatalf("present %d of %d blocks", m.Present(), m.Blocks())
		}
		if p := m.percent(); p < 0 || p > 100 {
			t.Fatalf("percent %d", p)
		}
		if m.complete() != (m.Present() == m.Blocks()) || m.complete() != m.has(0, vsize) {
			t.Fatalf("complete %v, present %d of %d, has all %v", m.complete(), m.Present(), m.Blocks(), m.has(0, vsize))
		}
		start, end := int64(a)%vsize, int64(b)%vsize+1
		if start > end {
			start, end = end-1, start+1
		}
		prev := int64(-1)
		for _, r := range m.missing(start, end) {
			if r[0] < prev || r[0] >= r[1] || r[0] > end || r[1] < start {
				t.Fatalf("Missing(%d, %d): bad range %v after %d", start, end, r, prev)
			}
			if m.has(r[0], r[1]) {
				t.Fatalf("Missing range %v is present", r)
			}
			prev = r[1]
		}
		if idx, ok := m.nextChunk(int64(a), a%2 == 0); ok && (idx < 0 || idx >= int64(len(m.bytes()))) {
			t.Fatalf("NextChunk = %d of %d bytes", idx, len(m.bytes()))
		}
		// the proxy sets 4 KiB-aligned ranges (relays are widened to them)
		start, end = start&^4095, (end+4095)&^4095
		completed, hbs := m.setRange(start, end)
		if !m.has(start, end) || completed && !m.complete() {
			t.Fatalf("SetRange(%d, %d): has %v, completed %v, complete %v", start, end, m.has(start, end), completed, m.complete())
		}
		for _, hb := range hbs {
			if !m.hashBlockComplete(hb) {
				t.Fatalf("SetRange reported hash block %d complete, map disagrees", hb)
			}
		}
		m.clear(start, end)
		if m.complete() {
			t.Fatalf("complete after Clear(%d, %d)", start, end)
		}

		img := filepath.Join(t.TempDir(), "x.r1")
		os.WriteFile(img, nil, 0o644)
		os.WriteFile(img+".meta", bits, 0o644)
		if _, err := readMeta(img); err == nil && !bytes.Contains(bytes.ToLower(bits), []byte("atime")) {
			t.Fatalf(".meta without an atime key parsed: %q", bits)
		}
	})
}
