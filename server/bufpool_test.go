package server

import "testing"

func TestBufPoolClasses(t *testing.T) {
	var p bufPool
	for _, n := range []int{1, 4096, 4097, 32 << 10, 1<<20 - 1, 1 << 20, 9000000, 16 << 20} {
		b := p.get(n)
		if len(b) != n {
			t.Fatalf("get(%d): len %d", n, len(b))
		}
		if c := cap(b); c < n || c&(c-1) != 0 || c < 4096 {
			t.Fatalf("get(%d): cap %d, want a power of two >= max(n, 4096)", n, c)
		}
		b[n-1] = 1
		p.put(b)
		if b2 := p.get(n); len(b2) != n {
			t.Fatalf("get(%d) after put: len %d", n, len(b2))
		}
	}
	// too large for a class: allocated, and put ignores it
	b := p.get(16<<20 + 1)
	if len(b) != 16<<20+1 {
		t.Fatalf("len %d", len(b))
	}
	p.put(b)
	// a foreign buffer whose capacity is not a class size is ignored
	p.put(make([]byte, 5000))
	if b := p.get(5000); cap(b) != 8192 {
		t.Fatalf("cap %d", cap(b))
	}
}
