package httpapi

import "net/http"

// recorder is a ResponseWriter that remembers the status and the number
// of body bytes written, for the request log.
type recorder struct {
	http.ResponseWriter
	code        int
	wroteHeader bool
	written     int64
}

// WriteHeader records the status code.
func (w *recorder) WriteHeader(code int) {
	if !w.wroteHeader && code >= 200 {
		w.code, w.wroteHeader = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

// Write counts the bytes written.
func (w *recorder) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.code, w.wroteHeader = http.StatusOK, true
	}
	n, err := w.ResponseWriter.Write(p)
	w.written += int64(n)
	return n, err
}

// Unwrap gives http.ResponseController the underlying writer.
func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// status is the status code sent (200 if the handler wrote nothing).
func (w *recorder) status() int {
	if !w.wroteHeader {
		return http.StatusOK
	}
	return w.code
}
