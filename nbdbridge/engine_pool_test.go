package nbdbridge

import "testing"

func TestBufferPool(t *testing.T) {
	var p bufferPool
	for _, tc := range []struct{ n, class, capacity int }{
		{1, 0, 4096}, {4096, 0, 4096}, {4097, 1, 8192}, {1 << 20, 8, 1 << 20},
		{1<<20 + 1, 9, 2 << 20}, {32 << 20, 13, 32 << 20}, {32<<20 + 1, -1, 32<<20 + 1},
	} {
		if c := poolClass(tc.n); c != tc.class {
			t.Errorf("poolClass(%d) = %d, want %d", tc.n, c, tc.class)
		}
		b := p.get(tc.n)
		if len(*b) != tc.n || cap(*b) != tc.capacity {
			t.Errorf("get(%d): len %d cap %d", tc.n, len(*b), cap(*b))
		}
		p.put(b)
	}
	p.put(nil)
	odd := make([]byte, 5000)
	p.put(&odd) // not a pool size: dropped
	if allocs := testing.AllocsPerRun(100, func() { p.put(p.get(4096)) }); allocs > 0 {
		t.Errorf("get/put allocates %.1f times", allocs)
	}
}
