// Package statusui holds what the status pages of dnbd3-server and
// dnbd3-merger share: the page's frame (head, header with the Pause
// button, footer), the base style sheet, the script helpers (common.js:
// element building, formatting, the polling loop) and the way the files
// are served (no external assets; a strict content security policy).
// Each page brings only its <main> element, its script and its extra
// style rules.
package statusui

import (
	"bytes"
	_ "embed"
	"html/template"
	"net/http"
	"strconv"
)

var (
	//go:embed base.css
	baseCSS []byte
	//go:embed common.js
	commonJS []byte
	//go:embed page.html
	pageHTML string
)

var frame = template.Must(template.New("page").Parse(pageHTML))

// Page is the files of one status page, put together once: "/" (the
// HTML), "/status.js" and "/status.css".
type Page struct {
	files map[string]file
}

type file struct {
	body        []byte
	contentType string
}

// NewPage assembles a page. name titles it and heads its header; main is
// its <main> element, js its script (run after common.js, whose helpers it
// reaches as UI.*), css its rules beyond base.css (may be nil).
func NewPage(name string, main, js, css []byte) *Page {
	var html bytes.Buffer
	err := frame.Execute(&html, struct {
		Name string
		Main template.HTML
	}{name, template.HTML(main)})
	if err != nil {
		panic("statusui: page frame: " + err.Error()) // a constant template and plain data
	}
	return &Page{files: map[string]file{
		"/":           {html.Bytes(), "text/html; charset=utf-8"},
		"/status.js":  {join(commonJS, js), "text/javascript; charset=utf-8"},
		"/status.css": {join(baseCSS, css), "text/css; charset=utf-8"},
	}}
}

// join returns a, a newline and b in a new slice.
func join(a, b []byte) []byte {
	out := make([]byte, 0, len(a)+1+len(b))
	return append(append(append(out, a...), '\n'), b...)
}

// Has reports whether path is one of the page's files.
func (p *Page) Has(path string) bool {
	_, ok := p.files[path]
	return ok
}

// Serve sends the file of path with the pages' common headers; false if
// path is none of the page's files.
func (p *Page) Serve(w http.ResponseWriter, path string) bool {
	f, ok := p.files[path]
	if !ok {
		return false
	}
	h := w.Header()
	h.Set("Content-Type", f.contentType)
	h.Set("Content-Length", strconv.Itoa(len(f.body)))
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'")
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(f.body)
	return true
}
