// Package statusui holds what the status pages of dnbd3-server and
// dnbd3-merger share: the base style sheet and the way their embedded
// files are served (no external assets; a strict content security
// policy).
package statusui

import (
	_ "embed"
	"net/http"
	"strconv"
)

// BaseCSS is the style both pages start from.
//
//go:embed base.css
var BaseCSS []byte

// CSS is BaseCSS followed by a page's own rules.
func CSS(extra []byte) []byte {
	b := make([]byte, 0, len(BaseCSS)+1+len(extra))
	b = append(append(append(b, BaseCSS...), '\n'), extra...)
	return b
}

// WriteAsset sends one of a page's files with the pages' common headers.
func WriteAsset(w http.ResponseWriter, body []byte, contentType string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'")
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(body)
}
