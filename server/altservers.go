package server

// The alt-servers file: other DNBD3 servers, announced to clients
// (GET_SERVERS) and used as uplinks by a proxy. Read once at startup.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// AltServersFileName is the name of the alt servers file in the
// configuration directory.
const altServersFileName = "alt-servers"

const (
	// MaxAltServers is the maximum number of entries of the alt-servers file.
	maxAltServers = 50
	// maxAltComment is the longest comment kept, in bytes.
	maxAltComment = 119
	// altRTTHistory is the number of RTT samples kept per alt server.
	altRTTHistory = 5
	// altResolveTimeout bounds the lookup of a host name in alt-servers.
	altResolveTimeout = 3 * time.Second
)

// AltServer is one entry of the alt-servers file plus its runtime state.
// The configuration fields are fixed after loading; the RTT history and
// failure count are guarded by a mutex and read with Snapshot.
type altServer struct {
	// Addr is the server's address and port (default port 5003).
	Addr netip.AddrPort
	// Comment is the free text of the entry (at most 119 bytes).
	Comment string
	// Private marks a replication-only entry (for=replication, or "-" in
	// the legacy format): used as uplink, never announced to clients.
	Private bool
	// ClientOnly marks an entry only announced to clients (for=client, or
	// "+" in the legacy format), never used as uplink.
	ClientOnly bool
	// Namespaces are image name prefixes; when not empty the entry is only
	// used for images whose name starts with one of them.
	Namespaces []string

	mu       sync.Mutex
	rtt      [altRTTHistory]uint32 // µs, oldest first
	fails    int
	lastFail time.Time
}

// AltServerStatus is a consistent copy of an AltServer's runtime state.
type altServerStatus struct {
	// RTT is the history of measured round-trip times in µs, oldest first;
	// 0 means no sample.
	RTT [altRTTHistory]uint32
	// Fails is the current count of consecutive failures.
	Fails int
}

// RecordRTT adds a round-trip time sample in µs, dropping the oldest.
func (a *altServer) recordRTT(us uint32) {
	a.mu.Lock()
	defer a.mu.Unlock()
	copy(a.rtt[:], a.rtt[1:])
	a.rtt[len(a.rtt)-1] = us
}

// RecordFailure counts a failed connection attempt or request and returns
// the new count.
func (a *altServer) recordFailure() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fails++
	a.lastFail = time.Now()
	return a.fails
}

// Failure thresholds of uplink selection: an alt server that failed
// altBlockFails times in a row is not used for altBlockTime after its last
// failure.
const (
	altBlockFails = 20
	altBlockTime  = 5 * time.Minute
)

// blocked reports whether the server failed too often recently to be
// tried as an uplink.
func (a *altServer) blocked() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.fails >= altBlockFails && time.Since(a.lastFail) < altBlockTime
}

// RecordSuccess resets the failure count.
func (a *altServer) recordSuccess() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fails = 0
}

// Snapshot returns the current RTT history and failure count.
func (a *altServer) snapshot() altServerStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	return altServerStatus{RTT: a.rtt, Fails: a.fails}
}

// AvgRTT returns the mean of the non-zero RTT samples, or 0 without samples.
func (a *altServer) avgRTT() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	var sum, n uint64
	for _, v := range a.rtt {
		if v != 0 {
			sum += uint64(v)
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return time.Duration(sum/n) * time.Microsecond
}

// Serves reports whether the entry may be used for image name: true without
// namespaces, else if name starts with one of them.
func (a *altServer) serves(name string) bool {
	if len(a.Namespaces) == 0 {
		return true
	}
	for _, ns := range a.Namespaces {
		if strings.HasPrefix(name, ns) {
			return true
		}
	}
	return false
}

// altResolver looks up a host name that is not an IP literal.
type altResolver func(ctx context.Context, host string) (netip.Addr, error)

// resolveHost looks host up with the system resolver and returns the first
// address.
func resolveHost(ctx context.Context, host string) (netip.Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, altResolveTimeout)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(addrs) == 0 {
		return netip.Addr{}, fmt.Errorf("server: no address for %s", host)
	}
	return addrs[0].Unmap(), nil
}

// LoadAltServers reads the alt-servers file at path. A missing file gives an
// empty list. Entries that cannot be used are skipped with a warning.
//
// The INI format is tried first: one section per server named by its
// address ([1.2.3.4], [1.2.3.4:5003], [[2001:db8::1]:5003], [2001:db8::1] or
// a host name, resolved once now), with the keys comment, for (client or
// replication) and namespace (repeatable). A section counts only if it has
// at least one key line. If that yields no server, the legacy format is
// used: one "[-|+]host[:port] [comment]" per line, "-" = private, "+" =
// client only, lines starting with "#" and bare "[...]" lines (INI section
// headers without keys) skipped.
func loadAltServers(path string) ([]*altServer, []string, error) {
	list, probs, err := readAltServers(path)
	return list, lineWarnings(path, probs), err
}

// readAltServers is LoadAltServers with the warnings as line-numbered
// problems (without the file name).
func readAltServers(path string) ([]*altServer, []Problem, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read alt servers: %w (fix the file's permissions or remove it)", err)
	}
	list, probs := parseAltServers(data, resolveHost)
	return list, probs, nil
}

// altParser collects alt server entries.
type altParser struct {
	resolve altResolver
	list    []*altServer
	probs   []Problem // warnings with line numbers, no file name
	full    bool      // the cap was hit and reported
	// inSection records a key line below an INI section header: the file
	// is meant to be in the INI format.
	inSection bool
}

func (p *altParser) warnf(line int, format string, args ...any) {
	p.probs = append(p.probs, Problem{Line: line, Msg: fmt.Sprintf(format, args...)})
}

// add registers an entry for addr or returns the existing one with the
// same address; nil when the list is full.
func (p *altParser) add(addr netip.AddrPort, line int) *altServer {
	for _, a := range p.list {
		if a.Addr == addr {
			return a
		}
	}
	if len(p.list) >= maxAltServers {
		if !p.full {
			p.warnf(line, "more than %d alt servers; ignoring the rest", maxAltServers)
			p.full = true
		}
		return nil
	}
	a := &altServer{Addr: addr}
	p.list = append(p.list, a)
	return a
}

// parseAltServers parses the alt-servers file contents. The problems are
// warnings with line numbers and no file name.
func parseAltServers(data []byte, resolve altResolver) ([]*altServer, []Problem) {
	p := &altParser{resolve: resolve}
	p.parseINIFormat(data)
	if len(p.list) > 0 {
		return p.list, p.probs
	}
	iniProbs := p.probs
	p.probs = nil
	p.parseLegacy(data)
	if len(p.list) == 0 && p.inSection {
		// Neither format worked, and the file was meant as INI: what the
		// legacy pass says about its lines would only confuse.
		return nil, iniProbs
	}
	return p.list, p.probs
}

// parseINIFormat reads the INI format. Consecutive key lines of one section
// header belong to one entry; a section name seen again adds to the same
// entry.
func (p *altParser) parseINIFormat(data []byte) {
	var (
		curSection string
		cur        *altServer
		curBad     bool // current section could not be used (warned once)
		started    bool
	)
	// Syntax errors are expected while probing a legacy file: not reported.
	_ = parseINI(bytes.NewReader(data), func(section, key, value string, line int) {
		p.inSection = p.inSection || section != ""
		if !started || section != curSection {
			started, curSection, cur, curBad = true, section, nil, false
			addr, err := p.parseHost(section)
			if err != nil {
				p.warnf(line, "invalid host section [%s]: %v; section ignored", section, err)
				curBad = true
			} else if cur = p.add(addr, line); cur == nil {
				curBad = true
			}
		}
		if curBad {
			return
		}
		switch key {
		case "comment":
			cur.Comment = truncateComment(value)
		case "for":
			switch {
			case strings.HasPrefix(value, "client"):
				cur.ClientOnly, cur.Private = true, false
			case value == "replication":
				cur.Private, cur.ClientOnly = true, false
			default:
				p.warnf(line, "[%s] for=%s: use for=client or for=replication; ignored", section, value)
			}
		case "namespace":
			cur.Namespaces = append(cur.Namespaces, value)
		default:
			p.warnf(line, "[%s] unknown key %q ignored", section, key)
		}
	})
}

// parseLegacy reads the legacy one-line-per-server format.
func (p *altParser) parseLegacy(data []byte) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	line := 0
	for sc.Scan() {
		line++
		text := sc.Text()
		if line == 1 {
			text = strings.TrimPrefix(text, string(utf8BOM))
		}
		fields := strings.Fields(text)
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if t := strings.TrimSpace(text); t[0] == '[' && t[len(t)-1] == ']' {
			// An INI section header without keys: not a server (see the
			// INI rule), even when no other section registered one.
			continue
		}
		host := fields[0]
		private, clientOnly := false, false
		switch host[0] {
		case '-':
			private, host = true, host[1:]
		case '+':
			clientOnly, host = true, host[1:]
		}
		addr, err := p.parseHost(host)
		if err != nil {
			p.warnf(line, "invalid alt server %q: %v; line ignored", fields[0], err)
			continue
		}
		a := p.add(addr, line)
		if a == nil {
			continue
		}
		comment := strings.TrimPrefix(strings.TrimSpace(text), fields[0])
		a.Comment = truncateComment(strings.TrimSpace(comment))
		a.Private, a.ClientOnly = private, clientOnly
	}
	if err := sc.Err(); err != nil {
		p.warnf(line+1, "%v; rest of the file ignored", err)
	}
}

// truncateComment cuts s to at most maxAltComment bytes without splitting a
// UTF-8 sequence.
func truncateComment(s string) string {
	if len(s) <= maxAltComment {
		return s
	}
	s = s[:maxAltComment]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// parseHost parses "addr", "addr:port", "[v6]", "[v6]:port", a bare IPv6
// address or a host name with optional port. The port defaults to 5003.
func (p *altParser) parseHost(s string) (netip.AddrPort, error) {
	s = strings.TrimSpace(s)
	host, portStr := s, ""
	switch {
	case s == "":
		return netip.AddrPort{}, badValue("empty address")
	case s[0] == '[':
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return netip.AddrPort{}, badValue("missing ']'")
		}
		host = s[1:end]
		rest := s[end+1:]
		if rest != "" {
			if rest[0] != ':' {
				return netip.AddrPort{}, badValuef("unexpected %q after ']'", rest)
			}
			portStr = rest[1:]
		}
	case strings.Count(s, ":") == 1:
		host, portStr, _ = strings.Cut(s, ":")
	}
	port := uint16(protocol.DefaultPort)
	if portStr != "" {
		n, err := strconv.ParseUint(portStr, 10, 16)
		if err != nil || n == 0 {
			return netip.AddrPort{}, badValuef("invalid port %q", portStr)
		}
		port = uint16(n)
	}
	if host == "" {
		return netip.AddrPort{}, badValue("empty address")
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(ip.Unmap(), port), nil
	}
	if !validHostname(host) {
		return netip.AddrPort{}, badValuef("%q is neither an IP address nor a host name", host)
	}
	ip, err := p.resolve(context.Background(), host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("cannot resolve %s: %w", host, err)
	}
	return netip.AddrPortFrom(ip.Unmap(), port), nil
}

// validHostname accepts letters, digits, '-', '_' and '.' labels.
func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// FormatHost formats an address as the RPC shows it: "127.0.0.1:15306" or
// "[::1]:5004".
func formatHost(ap netip.AddrPort) string {
	a := ap.Addr()
	if a.Is4In6() {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, ap.Port()).String()
}

// SelectForClient returns the GET_SERVERS entries for a client of image:
// the non-private entries serving the image, without self, closest network
// to client first (stable for ties), at most protocol.NumberServers.
func selectForClient(list []*altServer, client netip.Addr, image string, self netip.AddrPort) []protocol.ServerEntry {
	self = netip.AddrPortFrom(self.Addr().Unmap(), self.Port())
	type cand struct {
		a     *altServer
		score int
	}
	var cands []cand
	for _, a := range list {
		if a.Private || !a.serves(image) {
			continue
		}
		if self.IsValid() && netip.AddrPortFrom(a.Addr.Addr().Unmap(), a.Addr.Port()) == self {
			continue
		}
		cands = append(cands, cand{a, addrCloseness(client, a.Addr.Addr())})
	}
	slices.SortStableFunc(cands, func(x, y cand) int { return y.score - x.score })
	if len(cands) > protocol.NumberServers {
		cands = cands[:protocol.NumberServers]
	}
	out := make([]protocol.ServerEntry, len(cands))
	for i, c := range cands {
		out[i] = protocol.ServerEntry{Addr: c.a.Addr}
	}
	return out
}

// addrCloseness counts the equal leading 4-bit nibbles of two addresses of
// the same family (IPv4-mapped IPv6 counts as IPv4); 0 for different
// families.
func addrCloseness(x, y netip.Addr) int {
	x, y = x.Unmap(), y.Unmap()
	if !x.IsValid() || !y.IsValid() || x.Is4() != y.Is4() {
		return 0
	}
	xb, yb := x.AsSlice(), y.AsSlice()
	n := 0
	for i := range xb {
		if xb[i] == yb[i] {
			n += 2
			continue
		}
		if xb[i]>>4 == yb[i]>>4 {
			n++
		}
		break
	}
	return n
}

// Uplinks returns the entries a proxy may use as uplinks for image: not
// client-only, serving the image, and private ones only if privateOnly
// (proxyPrivateOnly).
func uplinks(list []*altServer, privateOnly bool, image string) []*altServer {
	var out []*altServer
	for _, a := range list {
		if a.ClientOnly || (privateOnly && !a.Private) || !a.serves(image) {
			continue
		}
		out = append(out, a)
	}
	return out
}
