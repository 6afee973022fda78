package nbdbridge

import (
	"math/bits"
	"sync"
)

// Buffer size classes: powers of two from 4 KiB to 32 MiB (the kernel's
// largest request). Larger buffers (only with EngineOptions.MaxRequest
// above 32 MiB) are allocated and dropped.
const (
	poolMinShift = 12 // 4 KiB
	poolMaxShift = 25 // 32 MiB
	poolClasses  = poolMaxShift - poolMinShift + 1
)

// bufferPool hands out payload buffers without allocating on the hot path:
// a request for n bytes gets a slice of a pooled buffer of the next power
// of two.
type bufferPool struct {
	classes [poolClasses]sync.Pool // of *[]byte
}

// class returns the size class for n bytes, or -1 if n is too large.
func poolClass(n int) int {
	if n <= 1<<poolMinShift {
		return 0
	}
	shift := bits.Len(uint(n - 1)) // smallest s with 1<<s >= n
	if shift > poolMaxShift {
		return -1
	}
	return shift - poolMinShift
}

// get returns a buffer with len n. Release it with put.
func (p *bufferPool) get(n int) *[]byte {
	c := poolClass(n)
	if c < 0 {
		b := make([]byte, n)
		return &b
	}
	if v := p.classes[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+poolMinShift))
	return &b
}

// put returns a buffer obtained from get.
func (p *bufferPool) put(b *[]byte) {
	if b == nil {
		return
	}
	c := cap(*b)
	if c < 1<<poolMinShift || c > 1<<poolMaxShift || c&(c-1) != 0 {
		return
	}
	p.classes[bits.Len(uint(c))-1-poolMinShift].Put(b)
}
