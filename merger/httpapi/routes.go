package httpapi

import (
	"net/http"
	"strings"
)

// action handles one route of one API generation. It writes the success
// reply itself and returns an error for everything else; the handler maps
// the error to a reply (see errors.go).
type action func(h *handler, g *generation, w http.ResponseWriter, r *http.Request) error

// route is one endpoint: its method, its API generation and its action.
type route struct {
	method string
	gen    *generation
	action action
	upload bool // an Update (counted in dnbd3_merger_uploads_total)
}

// buildRoutes returns the route table, keyed by the lower-case path.
func buildRoutes(gens ...*generation) map[string]route {
	m := make(map[string]route, 5*len(gens))
	for _, g := range gens {
		m[g.prefix+"create"] = route{http.MethodPost, g, (*handler).create, false}
		m[g.prefix+"update"] = route{http.MethodPost, g, (*handler).update, true}
		m[g.prefix+g.mergeAction] = route{http.MethodPost, g, (*handler).merge, false}
		m[g.prefix+"gettopmodifiedblocks"] = route{http.MethodGet, g, (*handler).topModified, false}
		m[g.prefix+"status"] = route{http.MethodGet, g, (*handler).status, false}
	}
	return m
}

// lookup finds the route of a request path, ignoring case and one
// trailing slash (as ASP.NET Core routing does).
func (h *handler) lookup(path string) (route, bool) {
	key := strings.ToLower(path)
	if len(key) > 1 {
		key = strings.TrimSuffix(key, "/")
	}
	rt, ok := h.routes[key]
	return rt, ok
}
