package nbdbridge

import (
	"bytes"
	"errors"
	"io"
	"syscall"
	"testing"
)

func TestMemoryBackend(t *testing.T) {
	m := NewMemoryBackend(8192)
	if n, err := m.WriteAt([]byte("hello"), 4090); n != 5 || err != nil {
		t.Fatalf("WriteAt: %d, %v", n, err)
	}
	p := make([]byte, 5)
	if n, err := m.ReadAt(p, 4090); n != 5 || err != nil || string(p) != "hello" {
		t.Fatalf("ReadAt: %d, %v, %q", n, err, p)
	}
	if n, err := m.ReadAt(p, 8190); n != 2 || err != io.EOF {
		t.Errorf("ReadAt across the end: %d, %v", n, err)
	}
	if _, err := m.WriteAt(p, 8190); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("WriteAt across the end: %v", err)
	}
	if err := m.Trim(4090, 2); err != nil {
		t.Fatal(err)
	}
	if err := m.WriteZeroes(4093, 1, true); err != nil {
		t.Fatal(err)
	}
	if got := m.Bytes()[4090:4095]; !bytes.Equal(got, []byte{0, 0, 'l', 0, 'o'}) {
		t.Errorf("after Trim/WriteZeroes: %q", got)
	}
	if err := m.Resize(16384); err != nil || m.Size() != 16384 {
		t.Fatalf("Resize: %v, size %d", err, m.Size())
	}
	if err := m.Resize(100); err != nil || m.Size() != 100 {
		t.Fatalf("Resize: %v, size %d", err, m.Size())
	}
	if err := m.Resize(200); err != nil || !bytes.Equal(m.Bytes()[100:], make([]byte, 100)) {
		t.Fatalf("grown part not zero: %v", err)
	}
	m.Flush()
	if m.Flushes() != 1 {
		t.Errorf("Flushes = %d", m.Flushes())
	}
	m.SetReadOnly(true)
	if !IsReadOnly(m) {
		t.Error("not read-only")
	}
	if _, err := m.WriteAt(p, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAt on read-only: %v", err)
	}
	if _, err := m.WriteAtFUA(p, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAtFUA on read-only: %v", err)
	}
	var _ interface {
		Backend
		Trimmer
		ZeroWriter
		Resizer
		FUAWriter
		ReadOnlyBackend
	} = m
}
