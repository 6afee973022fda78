package nbdbridge

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
)

// MemoryBackend is a Backend that keeps the export in memory. It
// implements every optional interface (Trimmer, ZeroWriter, Resizer,
// FUAWriter, ReadOnlyBackend) and is meant for tests, benchmarks and
// demos; Flush has nothing to make durable and only counts its calls.
type MemoryBackend struct {
	mu       sync.RWMutex
	data     []byte
	readOnly atomic.Bool
	flushes  atomic.Uint64
}

// NewMemoryBackend returns a zero-filled writable backend of size bytes.
func NewMemoryBackend(size int64) *MemoryBackend {
	return &MemoryBackend{data: make([]byte, size)}
}

// NewMemoryBackendFrom returns a writable backend serving data. It takes
// ownership of data: the caller must not use the slice afterwards.
func NewMemoryBackendFrom(data []byte) *MemoryBackend {
	return &MemoryBackend{data: data}
}

// SetReadOnly makes the backend refuse (or accept again) writes. The
// engine reads it when it is created.
func (m *MemoryBackend) SetReadOnly(ro bool) { m.readOnly.Store(ro) }

// ReadOnly implements ReadOnlyBackend.
func (m *MemoryBackend) ReadOnly() bool { return m.readOnly.Load() }

// ReadAt implements Backend (and io.ReaderAt: a read crossing the end
// returns the bytes before it and io.EOF).
func (m *MemoryBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 {
		return 0, fmt.Errorf("memory backend: negative offset %d: %w", off, syscall.EINVAL)
	}
	if off >= int64(len(m.data)) {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt implements Backend. Writes beyond the end fail with ENOSPC and
// change nothing.
func (m *MemoryBackend) WriteAt(p []byte, off int64) (int, error) {
	if m.readOnly.Load() {
		return 0, ErrReadOnly
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

// WriteAtFUA implements FUAWriter (memory is as durable as it gets).
func (m *MemoryBackend) WriteAtFUA(p []byte, off int64) (int, error) {
	return m.WriteAt(p, off)
}

// Size implements Backend.
func (m *MemoryBackend) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

// Flush implements Backend; it only counts the call.
func (m *MemoryBackend) Flush() error {
	m.flushes.Add(1)
	return nil
}

// Flushes returns how often Flush was called.
func (m *MemoryBackend) Flushes() uint64 { return m.flushes.Load() }

// Trim implements Trimmer: the range reads as zeros afterwards.
func (m *MemoryBackend) Trim(off, length int64) error {
	return m.WriteZeroes(off, length, false)
}

// WriteZeroes implements ZeroWriter.
func (m *MemoryBackend) WriteZeroes(off, length int64, noHole bool) error {
	if m.readOnly.Load() {
		return ErrReadOnly
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkRange(off, length); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	return nil
}

// Resize implements Resizer: growing appends zeros, shrinking cuts.
func (m *MemoryBackend) Resize(size int64) error {
	if size < 0 {
		return fmt.Errorf("memory backend: negative size %d: %w", size, syscall.EINVAL)
	}
	if m.readOnly.Load() {
		return ErrReadOnly
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if size <= int64(cap(m.data)) {
		old := len(m.data)
		m.data = m.data[:size]
		if int(size) > old {
			clear(m.data[old:])
		}
		return nil
	}
	d := make([]byte, size)
	copy(d, m.data)
	m.data = d
	return nil
}

// Bytes returns a copy of the current contents.
func (m *MemoryBackend) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

func (m *MemoryBackend) checkRange(off, length int64) error {
	if off < 0 || length < 0 {
		return fmt.Errorf("memory backend: negative offset or length: %w", syscall.EINVAL)
	}
	if off > int64(len(m.data)) || length > int64(len(m.data))-off {
		return fmt.Errorf("memory backend: %d bytes at %d beyond the end (%d): %w", length, off, len(m.data), syscall.ENOSPC)
	}
	return nil
}
