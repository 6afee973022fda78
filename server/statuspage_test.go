package server

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/promtest"
)

// getStatus fetches /status.json with query q.
func getStatus(t *testing.T, addr, q string) (int, map[string]any) {
	t.Helper()
	code, body := promtest.Fetch(t, "http://"+addr+"/status.json?"+q, "")
	var v map[string]any
	if code == 200 {
		if err := json.Unmarshal(body, &v); err != nil {
			t.Fatalf("status.json: %v: %s", err, body)
		}
	}
	return code, v
}

// TestStatusJSONPaging: 120 images come in pages of the requested size,
// sorted by name, filtered by a substring; a page past the end is the
// last page.
func TestStatusJSONPaging(t *testing.T) {
	base := t.TempDir()
	for i := range 120 {
		writeFile(t, filepath.Join(base, fmt.Sprintf("img%03d.r1", i)), make([]byte, 4096))
	}
	ts := runServer(t, base, "", nil, nil)
	_, doc := getStatus(t, ts.addr, "ioff=100&ilim=50")
	imgs := doc["images"].(map[string]any)
	items := imgs["items"].([]any)
	if imgs["total"].(float64) != 120 || imgs["offset"].(float64) != 100 || len(items) != 20 {
		t.Fatalf("page: total %v offset %v items %d", imgs["total"], imgs["offset"], len(items))
	}
	if name := items[0].(map[string]any)["name"]; name != "img100" {
		t.Errorf("first of the page %v", name)
	}
	_, doc = getStatus(t, ts.addr, "iq=IMG11&ilim=5")
	imgs = doc["images"].(map[string]any)
	if imgs["total"].(float64) != 10 || len(imgs["items"].([]any)) != 5 {
		t.Errorf("filter: %v", imgs)
	}
	_, doc = getStatus(t, ts.addr, "ioff=5000&ilim=50")
	if off := doc["images"].(map[string]any)["offset"].(float64); off != 100 {
		t.Errorf("offset past the end gave %v, want the last page at 100", off)
	}
	if doc["imageCount"].(float64) != 120 || doc["version"] != "test" {
		t.Errorf("summary: %v %v", doc["imageCount"], doc["version"])
	}
}

// TestStatusPagePermissions: the page needs STATS; the sections follow
// IMAGE_LIST, CLIENT_LIST and ALL.
func TestStatusPagePermissions(t *testing.T) {
	base := t.TempDir()
	writeFile(t, filepath.Join(base, "a.r1"), make([]byte, 4096))
	ts := runServer(t, base, "", map[string]string{"rpc.acl": "127.0.0.0/8 STATS\n"}, nil)
	code, doc := getStatus(t, ts.addr, "")
	if code != 200 || doc["images"] != nil || doc["clients"] != nil || doc["altservers"] != nil {
		t.Errorf("STATS only: %d %v", code, doc)
	}
	if code, body := promtest.Fetch(t, "http://"+ts.addr+"/", ""); code != 200 || !strings.Contains(string(body), "<title>dnbd3-server status</title>") {
		t.Errorf("page with STATS: %d", code)
	}
	if code, _ := promtest.Fetch(t, "http://"+ts.addr+"/status/map?id=1", ""); code != 403 {
		t.Errorf("map without IMAGE_LIST: %d", code)
	}
	ts2 := runServer(t, base, "", map[string]string{"rpc.acl": "127.0.0.0/8 IMAGE_LIST\n"}, nil)
	for _, p := range []string{"/", "/status.json"} {
		if code, _ := promtest.Fetch(t, "http://"+ts2.addr+p, ""); code != 403 {
			t.Errorf("%s without STATS: %d", p, code)
		}
	}
	ts3 := runServer(t, base, "", nil, nil)
	if _, doc := getStatus(t, ts3.addr, ""); doc["images"] == nil || doc["clients"] == nil || doc["permissions"] != "ALL" {
		t.Errorf("no rpc.acl: %v", doc)
	}
	for _, p := range []string{"/status.js", "/status.css"} {
		if code, body := promtest.Fetch(t, "http://"+ts3.addr+p, ""); code != 200 || len(body) < 500 {
			t.Errorf("%s: %d, %d bytes", p, code, len(body))
		}
	}
}

// TestImageMapCells aggregates a cache map: a 64-block image in 8 cells
// with blocks 0-11 present gives 100, 50, 0, ...; in 64 cells one per
// block; a complete image is all 100.
func TestImageMapCells(t *testing.T) {
	img := &image{ID: 7, VirtualSize: 64 * 4096}
	cm := newCacheMap(img.VirtualSize)
	cm.setRange(0, 12*4096)
	img.cache.Store(cm)
	m := imageMap(img, 8)
	if m.BlocksPerCell != 8 || len(m.Cells) != 8 || m.Cells[0] != 100 || m.Cells[1] != 50 || m.Cells[2] != 0 || m.Complete {
		t.Errorf("8 cells: %+v", m)
	}
	m = imageMap(img, 1000)
	if m.BlocksPerCell != 1 || len(m.Cells) != 64 || m.Cells[11] != 100 || m.Cells[12] != 0 {
		t.Errorf("per block: per %d cells %d %v", m.BlocksPerCell, len(m.Cells), m.Cells[10:14])
	}
	img.cache.Store(nil)
	m = imageMap(img, 8)
	if !m.Complete || m.Cells[7] != 100 {
		t.Errorf("complete: %+v", m)
	}
	if n := countBits([]byte{0xFF, 0x0F, 0x01}, 3, 24); n != 5+4+1 {
		t.Errorf("countBits %d", n)
	}
}
