package statusui

import (
	"bytes"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestPage assembles a page and serves its three files: the frame around
// the page's <main>, common.js ahead of the page's script, base.css ahead
// of its rules, each with the pages' headers; other paths are not the
// page's.
func TestPage(t *testing.T) {
	p := NewPage("dnbd3-x", []byte("<main id=m></main>"), []byte("page();"), []byte(".x{}"))
	for _, c := range []struct {
		path, ctype string
		head, tail  []byte
	}{
		{"/", "text/html; charset=utf-8", []byte("<!DOCTYPE html>"), []byte("</html>\n")},
		{"/status.js", "text/javascript; charset=utf-8", commonJS, []byte("\npage();")},
		{"/status.css", "text/css; charset=utf-8", baseCSS, []byte("\n.x{}")},
	} {
		if !p.Has(c.path) {
			t.Errorf("Has(%q) false", c.path)
		}
		w := httptest.NewRecorder()
		if !p.Serve(w, c.path) {
			t.Fatalf("Serve(%q) false", c.path)
		}
		body := w.Body.Bytes()
		if !bytes.HasPrefix(body, c.head) || !bytes.HasSuffix(body, c.tail) {
			t.Errorf("%s: body %.60q...%q", c.path, body, body[max(0, len(body)-20):])
		}
		h := w.Result().Header
		if h.Get("Content-Type") != c.ctype || h.Get("X-Content-Type-Options") != "nosniff" ||
			!strings.Contains(h.Get("Content-Security-Policy"), "script-src 'self'") {
			t.Errorf("%s: headers %v", c.path, h)
		}
	}
	w := httptest.NewRecorder()
	p.Serve(w, "/")
	html := w.Body.String()
	for _, want := range []string{"<title>dnbd3-x status</title>", "<h1>dnbd3-x</h1>", "<main id=m></main>", `<script src="status.js"></script>`, `id="pause"`, `id="error"`} {
		if !strings.Contains(html, want) {
			t.Errorf("page lacks %s:\n%s", want, html)
		}
	}
	if p.Has("/other") || p.Serve(httptest.NewRecorder(), "/other") {
		t.Error("/other served")
	}
}
