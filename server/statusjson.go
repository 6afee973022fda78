package server

import (
	"cmp"
	mbits "math/bits"
	"slices"
	"strings"
	"time"
)

// statusDoc is /status.json.
type statusDoc struct {
	Version       string        `json:"version"`
	RunID         uint64        `json:"runId"`
	Uptime        int64         `json:"uptimeSeconds"`
	IsProxy       bool          `json:"isProxy"`
	BytesSent     uint64        `json:"bytesSent"`
	BytesReceived uint64        `json:"bytesReceived"`
	Clients       int           `json:"clientCount"`
	Servers       int           `json:"serverCount"`
	ImageCount    int           `json:"imageCount"`
	Images        *statusPageOf `json:"images"`     // null without IMAGE_LIST
	ClientList    *statusPageOf `json:"clients"`    // null without CLIENT_LIST
	AltServers    []altStatus   `json:"altservers"` // null without ALL
	Perm          string        `json:"permissions"`
}

// statusPageOf is one page of a longer list.
type statusPageOf struct {
	Total  int `json:"total"`
	Offset int `json:"offset"`
	Items  any `json:"items"`
}

type imageStatus struct {
	ID        int     `json:"id"`
	Name      string  `json:"name"`
	RID       uint16  `json:"rid"`
	Size      int64   `json:"size"`
	Users     int     `json:"users"`
	Complete  float64 `json:"complete"` // 0..1
	Problems  uint32  `json:"problems"`
	Idle      int64   `json:"idleSeconds"`
	Uplink    string  `json:"uplink,omitempty"`
	UplinkRTT int64   `json:"uplinkRttMicros,omitempty"`
	Fetching  int     `json:"fetching,omitempty"` // uplink fetches in flight
}

type clientStatus struct {
	Address   string `json:"address"`
	Image     string `json:"image"`
	Server    bool   `json:"isServer,omitempty"`
	Protocol  string `json:"protocol"`
	BytesSent uint64 `json:"bytesSent"`
}

type altStatus struct {
	Host       string   `json:"host"`
	Comment    string   `json:"comment"`
	RTT        []uint32 `json:"rtt"` // microseconds, oldest first
	Fails      int      `json:"numFails"`
	Private    bool     `json:"isPrivate"`
	ClientOnly bool     `json:"isClientOnly"`
	Uplinks    int      `json:"uplinks"` // images whose uplink is this server now
}

// pageQuery selects the pages of images and clients.
type pageQuery struct {
	imgOff, imgLim, cliOff, cliLim int
	imgFilter, cliFilter           string
}

// status builds the status document for a caller with perm.
func (s *Server) status(perm aclPerm, pq pageQuery) statusDoc {
	images := s.store.list()
	doc := statusDoc{
		Version: s.opts.Version, RunID: s.runID, Uptime: int64(time.Since(s.started) / time.Second),
		IsProxy: s.config().IsProxy, BytesSent: s.bytesSent.Load(), BytesReceived: s.bytesRecv.Load(),
		ImageCount: len(images), Perm: perm.String(),
	}
	doc.Clients, doc.Servers = s.peerCounts()
	if perm.has(permImageList) {
		doc.Images = imagePage(images, pq)
	}
	if perm.has(permClientList) {
		doc.ClientList = s.clientPage(s.clientList(), pq)
	}
	if perm.has(permAll) {
		doc.AltServers = s.altStatus(images)
	}
	return doc
}

// imagePage returns the requested page of images sorted by name and rid.
func imagePage(images []*image, pq pageQuery) *statusPageOf {
	f := strings.ToLower(pq.imgFilter)
	var sel []*image
	for _, img := range images {
		if f == "" || strings.Contains(strings.ToLower(img.Name), f) {
			sel = append(sel, img)
		}
	}
	slices.SortFunc(sel, func(a, b *image) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), cmp.Compare(a.RID, b.RID))
	})
	lo, hi := pageBounds(len(sel), pq.imgOff, pq.imgLim)
	items := make([]imageStatus, 0, hi-lo)
	for _, img := range sel[lo:hi] {
		items = append(items, imageStatusOf(img))
	}
	return &statusPageOf{Total: len(sel), Offset: lo, Items: items}
}

func imageStatusOf(img *image) imageStatus {
	st := imageStatus{ID: img.ID, Name: img.Name, RID: img.RID, Size: img.VirtualSize, Users: img.Users(),
		Problems: img.Problems(), Idle: int64(img.idle() / time.Second)}
	st.Complete, _ = presence(img)
	if up := img.up.Load(); up != nil {
		st.Uplink = up.server()
		st.Fetching = fetchesInFlight(up)
		if up.connected() {
			st.UplinkRTT = up.ci.Stats().CurrentRTT.Microseconds()
		}
	}
	return st
}

// clientPage returns the requested page of DNBD3 and iSCSI clients sorted
// by image and address.
func (s *Server) clientPage(clients []*clientConn, pq pageQuery) *statusPageOf {
	all := make([]clientStatus, 0, len(clients))
	for _, cc := range clients {
		proto := "dnbd3"
		if cc.nbd.Load() {
			proto = "nbd"
		}
		all = append(all, clientStatus{Address: cc.addr.String(), Image: cc.img.String(), Server: cc.isServer.Load(),
			Protocol: proto, BytesSent: cc.bytesSent.Load()})
	}
	for _, si := range s.iscsi.Sessions() {
		if d, ok := si.Disk.(*iscsiDisk); ok {
			all = append(all, clientStatus{Address: si.Remote.String(), Image: d.img.String(), Protocol: "iscsi", BytesSent: si.BytesSent})
		}
	}
	f := strings.ToLower(pq.cliFilter)
	sel := all[:0]
	for _, c := range all {
		if f == "" || strings.Contains(strings.ToLower(c.Address+" "+c.Image), f) {
			sel = append(sel, c)
		}
	}
	slices.SortFunc(sel, func(a, b clientStatus) int {
		return cmp.Or(strings.Compare(a.Image, b.Image), strings.Compare(a.Address, b.Address))
	})
	lo, hi := pageBounds(len(sel), pq.cliOff, pq.cliLim)
	return &statusPageOf{Total: len(sel), Offset: lo, Items: sel[lo:hi]}
}

// altStatus lists the alt servers with their RTT history and the number
// of images whose uplink they are.
func (s *Server) altStatus(images []*image) []altStatus {
	current := map[string]int{}
	for _, img := range images {
		if up := img.up.Load(); up != nil {
			if h := up.server(); h != "" {
				current[h]++
			}
		}
	}
	out := make([]altStatus, 0, len(s.alts))
	for _, a := range s.alts {
		snap := a.snapshot()
		host := formatHost(a.Addr)
		out = append(out, altStatus{Host: host, Comment: a.Comment, RTT: append([]uint32{}, snap.RTT[:]...), Fails: snap.Fails,
			Private: a.Private, ClientOnly: a.ClientOnly, Uplinks: current[host]})
	}
	return out
}

// pageBounds clamps a page [off, off+lim) to n items.
func pageBounds(n, off, lim int) (lo, hi int) {
	lo = min(off, n)
	if lo > 0 && lo == n {
		lo = max(0, (n-1)/lim*lim) // past the end: the last page
	}
	return lo, min(lo+lim, n)
}

// mapDoc is /status/map: the cache map of an image in cells.
type mapDoc struct {
	ID            int      `json:"id"`
	Blocks        int64    `json:"blocks"`        // 4 KiB blocks of the image
	BlocksPerCell int64    `json:"blocksPerCell"` // blocks each cell stands for
	Complete      bool     `json:"complete"`
	Cells         []uint8  `json:"cells"`    // percent present per cell (base64 in JSON: one byte per cell)
	Fetching      [][2]int `json:"fetching"` // cell ranges [from, to) being fetched
}

// imageMap aggregates img's cache map into at most cells cells.
func imageMap(img *image, cells int) mapDoc {
	blocks := (img.VirtualSize + 4095) / 4096
	per := max(1, (blocks+int64(cells)-1)/int64(cells))
	n := int((blocks + per - 1) / per)
	doc := mapDoc{ID: img.ID, Blocks: blocks, BlocksPerCell: per, Cells: make([]uint8, n), Fetching: [][2]int{}}
	cm := img.cache.Load()
	if cm == nil {
		doc.Complete = true
		for i := range doc.Cells {
			doc.Cells[i] = 100
		}
		return doc
	}
	// counted under the map's read lock, without copying it (a 100 GiB
	// image has a 3.2 MB map)
	cm.mu.RLock()
	for c := range n {
		lo, hi := int64(c)*per, min(int64(c+1)*per, blocks)
		doc.Cells[c] = uint8(countBits(cm.bits, lo, hi) * 100 / (hi - lo))
	}
	cm.mu.RUnlock()
	if up := img.up.Load(); up != nil {
		up.mu.Lock()
		for _, f := range up.fetches {
			from := int(f.start / 4096 / per)
			to := int((f.end/4096 + per - 1) / per)
			doc.Fetching = append(doc.Fetching, [2]int{from, min(max(to, from+1), n)})
		}
		up.mu.Unlock()
	}
	return doc
}

// countBits counts the set bits [lo, hi) of an LSB-first bitmap, whole
// bytes at a time where it can.
func countBits(bm []byte, lo, hi int64) int64 {
	hi = min(hi, int64(len(bm))*8)
	var n int64
	for b := lo; b < hi; {
		if b%8 == 0 && hi-b >= 8 {
			n += int64(mbits.OnesCount8(bm[b/8]))
			b += 8
			continue
		}
		if bm[b/8]&(1<<(b%8)) != 0 {
			n++
		}
		b++
	}
	return n
}
