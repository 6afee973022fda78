package server

import (
	"math/bits"
	"sync"
)

// bufPool recycles the buffers that proxy fetches read uplink data into
// (up to maxPayload, 9 MB by default). Allocating them afresh costs
// zeroing and, at hundreds of MB/s, a garbage collection every few
// megabytes: a quarter of a proxy's CPU time while relaying a cold image.
// Buffers come in power-of-two classes from 4 KiB to 16 MiB.
type bufPool struct {
	classes [bufClasses]sync.Pool // of *[]byte
}

const (
	bufMinShift = 12 // 4 KiB
	bufClasses  = 13 // ... 16 MiB
)

// bufClass returns the class of an n-byte buffer, or -1 if n is too large.
func bufClass(n int) int {
	if n <= 1<<bufMinShift {
		return 0
	}
	c := bits.Len(uint(n-1)) - bufMinShift
	if c >= bufClasses {
		return -1
	}
	return c
}

// get returns a buffer of length n; its contents are undefined.
func (p *bufPool) get(n int) []byte {
	c := bufClass(n)
	if c < 0 {
		return make([]byte, n)
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+bufMinShift))
}

// put returns a buffer from get; nothing may use it afterwards.
func (p *bufPool) put(b []byte) {
	c := bufClass(cap(b))
	if c < 0 || cap(b) != 1<<(c+bufMinShift) {
		return
	}
	b = b[:cap(b)]
	p.classes[c].Put(&b)
}
