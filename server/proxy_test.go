package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// capturedRanges are the five reads of the captured proxy session
// (testdata/sidecars/README.md).
var capturedRanges = [][2]int64{{0, 4096}, {100000, 50000}, {16775168, 4096}, {33554432, 131072}, {41953280, 2048}}

// TestProxyMatchesReferenceCapture repeats the captured proxy session: a
// proxy (backgroundReplication=false, maxPrefetch=0) clones crctest from
// the origin through a logging relay while a raw client reads five ranges.
// The uplink traffic, the live /cachemap, the RPC output and the sidecars
// written at shutdown are compared with what the reference produced.
func TestProxyMatchesReferenceCapture(t *testing.T) {
	origin := runServer(t, crctestFiles(t), "", nil, nil)
	rec := startRecorder(t, origin.addr)
	alts := "[" + rec.addr() + "]\ncomment=origin via logging relay\n\n[127.0.0.3:5003]\ncomment=announced to clients only (nothing listens)\nfor=client\n"
	proxyBase := t.TempDir()
	proxy := runServer(t, proxyBase, proxyConf+"[limits]\nmaxPrefetch=0\n", map[string]string{"alt-servers": alts}, nil)

	c := dial(t, proxy.addr)
	sel := handshake(t, c, "crctest", 1)
	if sel.Size != 41955328 || sel.RID != 1 || sel.Name != "crctest" {
		t.Fatalf("select reply %+v", sel)
	}
	var sent int64
	for i, r := range capturedRanges {
		rep, p := getBlock(t, c, uint64(r[0]), uint32(r[1]), 0, uint64(i+1))
		if rep.Cmd != protocol.CmdGetBlock || rep.Handle != uint64(i+1) || !bytes.Equal(p, genPadded(r[0], r[1], crctestSize)) {
			t.Fatalf("range %v: reply %v, data ok %v", r, rep, bytes.Equal(p, genPadded(r[0], r[1], crctestSize)))
		}
		sent += r[1]
	}

	// The uplink connection's requests are byte-identical to the capture:
	// SELECT_IMAGE (flags 0x01), GET_CRC32, then the five 4 KiB-aligned
	// GET_BLOCKs with hop count 1 and handles 1..5.
	var want [][]byte
	for _, m := range testutil.ReadWire(t, "proxy-uplink.txt") {
		if m.FromClient && protocol.Cmd(m.Bytes[2]) != protocol.CmdKeepalive {
			want = append(want, m.Bytes)
		}
	}
	got := rec.connRequests(1)
	if len(got) < len(want) {
		t.Fatalf("uplink sent %d requests, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("uplink request %d:\n got  %x\n want %x", i, got[i], want[i])
		}
	}
	if bb := rec.blockBytes(); bb != 200704 {
		t.Errorf("upstream GET_BLOCK bytes %d, want 200704", bb)
	}

	// live cache map = the reference's
	refMap, _ := os.ReadFile(testutil.Testdata(t, "rpc", "cachemap-proxy-id1.bin"))
	code, hdr, body := httpGet(t, proxy.addr, "/cachemap?id=1")
	if code != 200 || !bytes.Equal(body, refMap) || hdr.Get("Content-Type") != "application/octet-stream; charset=utf-8" {
		t.Fatalf("/cachemap: %d, %d bytes, equal %v", code, len(body), bytes.Equal(body, refMap))
	}

	// RPC: same keys in the same order as the reference proxy's output
	ref, _ := os.ReadFile(testutil.Testdata(t, "rpc", "query-all.json"))
	all := queryJSON(t, proxy.addr, "q=stats&q=images&q=clients&q=space&q=version&q=altservers", nil)
	if g, w := shape(t, all), shape(t, ref); strings.Join(g, " ") != strings.Join(w, " ") {
		t.Fatalf("key order differs:\n got  %v\n want %v", g, w)
	}
	var v struct {
		BytesReceived uint64 `json:"bytesReceived"`
		BytesSent     uint64 `json:"bytesSent"`
		ClientCount   int    `json:"clientCount"`
		Images        []map[string]any
		Clients       []map[string]any
		Altservers    []map[string]any
	}
	json.Unmarshal(all, &v)
	img := v.Images[0]
	if v.BytesReceived != 200704 || v.BytesSent != uint64(sent) || v.ClientCount != 1 ||
		img["name"] != "crctest" || img["complete"] != 0.0 || img["size"] != 41955328.0 || img["problems"] != 0.0 ||
		img["users"] != 1.0 || img["bytesReceived"] != 200704.0 || img["uplinkServer"] != rec.addr() || img["wwn"] != 2646709220093671306.0 {
		t.Errorf("query: %s", all)
	}
	if len(v.Altservers) != 2 || v.Altservers[0]["host"] != rec.addr() || v.Altservers[1]["isClientOnly"] != true ||
		v.Altservers[1]["comment"] != "announced to clients only (nothing listens)" {
		t.Errorf("altservers: %v", v.Altservers)
	}
	if !bytes.Contains(all, []byte(`"problems": 0, "bytesReceived": 200704, "uplinkServer": "`+rec.addr()+`"}`)) {
		t.Errorf("image entry spacing: %s", all)
	}

	// the local copy: padded size, the reference's .crc
	path := filepath.Join(proxyBase, "crctest.r1")
	if st, err := os.Stat(path); err != nil || st.Size() != 41955328 {
		t.Fatalf("local copy: %v %v", st, err)
	}
	refCRC, _ := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.crc"))
	if b, _ := os.ReadFile(path + ".crc"); !bytes.Equal(b, refCRC) {
		t.Errorf(".crc %x, want %x", b, refCRC)
	}

	// shutdown writes the map and .meta the reference wrote
	c.Close()
	proxy.stop()
	refMapFile, _ := os.ReadFile(testutil.Testdata(t, "sidecars", "crctest.r1.map"))
	if b, _ := os.ReadFile(path + ".map"); !bytes.Equal(b, refMapFile) {
		t.Errorf(".map at shutdown differs from the reference (%d bytes)", len(b))
	}
	meta, _ := os.ReadFile(path + ".meta")
	var atime int64
	if n, _ := fmt.Sscanf(string(meta), "[main]\natime=%d\n", &atime); n != 1 || time.Since(time.Unix(atime, 0)) > time.Minute {
		t.Errorf(".meta %q", meta)
	}
	// every block present holds the right data, every other one is zero
	local, _ := os.ReadFile(path)
	m, _ := loadCacheMap(path+".map", 41955328)
	want0 := genPadded(0, 41955328, crctestSize)
	for b := int64(0); b < m.Blocks(); b++ {
		off := b * 4096
		exp := want0[off : off+4096]
		if !m.has(off, off+4096) {
			exp = make([]byte, 4096)
		}
		if !bytes.Equal(local[off:off+4096], exp) {
			t.Fatalf("block %d of the local copy is wrong", b)
		}
	}
}

// genPadded returns n bytes of the generator image of fileSize bytes at
// off, zeros past fileSize.
func genPadded(off, n, fileSize int64) []byte {
	b := testutil.GenImage(off, n)
	for i := range b {
		if off+int64(i) >= fileSize {
			b[i] = 0
		}
	}
	return b
}
