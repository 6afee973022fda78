package protocol

import "bytes"

// Writer builds a serialized payload of at most MaxPayload bytes: fields
// back to back, integers little-endian, strings NUL-terminated. Like the
// reference, a field that does not fit is silently dropped.
type Writer struct {
	buf []byte
}

func (w *Writer) fits(n int) bool { return len(w.buf)+n <= MaxPayload }

// PutU8 appends one byte.
func (w *Writer) PutU8(v uint8) {
	if w.fits(1) {
		w.buf = append(w.buf, v)
	}
}

// PutU16 appends a little-endian u16.
func (w *Writer) PutU16(v uint16) {
	if w.fits(2) {
		w.buf = le.AppendUint16(w.buf, v)
	}
}

// PutU32 appends a little-endian u32.
func (w *Writer) PutU32(v uint32) {
	if w.fits(4) {
		w.buf = le.AppendUint32(w.buf, v)
	}
}

// PutU64 appends a little-endian u64.
func (w *Writer) PutU64(v uint64) {
	if w.fits(8) {
		w.buf = le.AppendUint64(w.buf, v)
	}
}

// PutString appends s and a NUL terminator.
func (w *Writer) PutString(s string) {
	if w.fits(len(s) + 1) {
		w.buf = append(append(w.buf, s...), 0)
	}
}

// Bytes returns the payload written so far.
func (w *Writer) Bytes() []byte { return w.buf }

// Reader decodes a serialized payload with the reference's rules: reading an
// integer past the end yields 0, a string without a NUL terminator inside the
// buffer yields "no string".
type Reader struct {
	buf []byte
	pos int
}

// NewReader returns a Reader over b.
func NewReader(b []byte) *Reader { return &Reader{buf: b} }

func (r *Reader) take(n int) []byte {
	if r.pos+n > len(r.buf) {
		r.pos = len(r.buf)
		return nil
	}
	b := r.buf[r.pos : r.pos+n]
	r.pos += n
	return b
}

// U8 reads one byte, or 0 past the end.
func (r *Reader) U8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

// U16 reads a little-endian u16, or 0 past the end.
func (r *Reader) U16() uint16 {
	if b := r.take(2); b != nil {
		return le.Uint16(b)
	}
	return 0
}

// U32 reads a little-endian u32, or 0 past the end.
func (r *Reader) U32() uint32 {
	if b := r.take(4); b != nil {
		return le.Uint32(b)
	}
	return 0
}

// U64 reads a little-endian u64, or 0 past the end.
func (r *Reader) U64() uint64 {
	if b := r.take(8); b != nil {
		return le.Uint64(b)
	}
	return 0
}

// String reads a NUL-terminated string. ok is false if no terminator
// follows within the buffer.
func (r *Reader) String() (s string, ok bool) {
	rest := r.buf[r.pos:]
	i := bytes.IndexByte(rest, 0)
	if i < 0 {
		r.pos = len(r.buf)
		return "", false
	}
	r.pos += i + 1
	return string(rest[:i]), true
}
