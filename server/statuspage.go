package server

// The status page: GET / serves an HTML page (embedded, no external
// assets) that polls /status.json and draws the cache maps of incomplete
// images from /status/map. Access follows rpc.acl: the page needs STATS,
// its image list IMAGE_LIST, its client list CLIENT_LIST and the alt
// servers ALL (as q=altservers does).

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"strconv"

	"github.com/dnbd3go/dnbd3go/internal/statusui"
)

var (
	//go:embed statusui/main.html
	statusMain []byte
	//go:embed statusui/status.js
	statusJS []byte
)

// newStatusPage assembles the page's files (once, when the RPC server is
// made).
func newStatusPage() *statusui.Page {
	return statusui.NewPage("dnbd3-server", statusMain, statusJS, nil)
}

// Page sizes of the status JSON: the page shows a page of images and one
// of clients at a time, so a server with thousands of either answers a
// poll with a few kilobytes.
const (
	statusDefaultPage = 50
	statusMaxPage     = 500
	statusMaxCells    = 8192 // cells of a drawn cache map
)

// statusPage serves the page's files.
func (r *rpcServer) statusPage(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.has(permStats) {
		textReply(w, http.StatusForbidden, "No permission to access statistics")
		return
	}
	w.Header().Set("Cache-Control", "no-cache")
	r.page.Serve(w, req.URL.Path)
}

// statusJSON answers /status.json?ioff=&ilim=&iq=&coff=&clim=&cq=.
func (r *rpcServer) statusJSON(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.has(permStats) {
		textReply(w, http.StatusForbidden, "No permission to access statistics")
		return
	}
	q := req.URL.Query()
	doc := r.srv.status(perm, pageQuery{
		imgOff: queryInt(q.Get("ioff"), 0, 0, 1<<30), imgLim: queryInt(q.Get("ilim"), statusDefaultPage, 1, statusMaxPage),
		imgFilter: q.Get("iq"),
		cliOff:    queryInt(q.Get("coff"), 0, 0, 1<<30), cliLim: queryInt(q.Get("clim"), statusDefaultPage, 1, statusMaxPage),
		cliFilter: q.Get("cq"),
	})
	writeJSON(w, doc)
}

// statusMap answers /status/map?id=N&cells=C with the image's cache map
// aggregated into at most C cells.
func (r *rpcServer) statusMap(w http.ResponseWriter, req *http.Request, perm aclPerm) {
	if !perm.has(permImageList) {
		textReply(w, http.StatusForbidden, "No permission to access image list")
		return
	}
	q := req.URL.Query()
	id, err := strconv.Atoi(q.Get("id"))
	img := r.srv.store.byID(id)
	if err != nil || img == nil {
		textReply(w, http.StatusNotFound, "Image not found")
		return
	}
	writeJSON(w, imageMap(img, queryInt(q.Get("cells"), 1024, 1, statusMaxCells)))
}

// queryInt parses a query parameter, def if absent or invalid, clamped
// to [lo, hi].
func queryInt(v string, def, lo, hi int) int {
	n, err := strconv.Atoi(v)
	if err != nil {
		return def
	}
	return min(max(n, lo), hi)
}

func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		textReply(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Cache-Control", "no-store")
	w.Write(body)
}
