package client

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// rttSamples is the number of probe RTTs averaged per server.
const rttSamples = 4

// maxBestCount caps server.bestCount (kernel client rule).
const maxBestCount = 178

// server is one entry of the server list. Its fields are guarded by
// Image.mu, except addr and learned, which never change.
type server struct {
	addr    netip.AddrPort
	key     string // addr.String(), the dial address
	learned bool   // from GET_SERVERS rather than Config.Servers
	added   bool   // added at runtime (AddServer, SwitchServer); guarded by Image.mu

	rtt      [rttSamples]time.Duration
	nrtt     int // valid samples
	rttPos   int
	liveRTT  time.Duration // EWMA (3:1) of real request latency
	hsRTT    time.Duration // connect-to-handshake time of the last connection
	failures uint64
	consec   int
	lastErr  error
	lastErrT time.Time
	best     int // bestCount
}

func newServer(a netip.AddrPort, learned bool) *server {
	a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
	return &server{addr: a, key: a.String(), learned: learned}
}

// avgRTT returns the average of the probe samples, or 0 without samples.
func (s *server) avgRTT() time.Duration {
	if s.nrtt == 0 {
		return 0
	}
	var sum time.Duration
	for i := 0; i < s.nrtt; i++ {
		sum += s.rtt[i]
	}
	return sum / time.Duration(s.nrtt)
}

// rttEstimate is the best RTT guess for timeouts: the probe average, else
// the live RTT, else the handshake time.
func (s *server) rttEstimate() time.Duration {
	if r := s.avgRTT(); r > 0 {
		return r
	}
	if s.liveRTT > 0 {
		return s.liveRTT
	}
	return s.hsRTT
}

func (s *server) addSample(d time.Duration) {
	if d <= 0 {
		d = time.Microsecond
	}
	s.rtt[s.rttPos] = d
	s.rttPos = (s.rttPos + 1) % rttSamples
	if s.nrtt < rttSamples {
		s.nrtt++
	}
	s.consec = 0
}

func (s *server) addLive(d time.Duration) {
	if s.liveRTT == 0 {
		s.liveRTT = d
	} else {
		s.liveRTT = (3*s.liveRTT + d) / 4
	}
}

func (s *server) fail(err error, now time.Time) {
	s.failures++
	s.consec++
	s.lastErr = err
	s.lastErrT = now
}

// parseHostSpec splits one host entry into host and port. Accepted forms:
// "host", "host:port", "[v6]", "[v6]:port" and a bare IPv6 address.
func parseHostSpec(spec string) (host string, port uint16, err error) {
	if a, err := netip.ParseAddr(spec); err == nil {
		return a.String(), protocol.DefaultPort, nil
	}
	if strings.HasPrefix(spec, "[") && strings.HasSuffix(spec, "]") {
		a, err := netip.ParseAddr(spec[1 : len(spec)-1])
		if err != nil {
			return "", 0, fmt.Errorf("bad IPv6 address %q: %w", spec, err)
		}
		return a.String(), protocol.DefaultPort, nil
	}
	h, p, err := net.SplitHostPort(spec)
	if err != nil {
		if strings.Contains(spec, ":") {
			return "", 0, fmt.Errorf("client: bad server %q: use host, host:port or [v6]:port", spec)
		}
		return spec, protocol.DefaultPort, nil
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("client: bad port in server %q", spec)
	}
	if h == "" {
		return "", 0, fmt.Errorf("client: bad server %q: empty host", spec)
	}
	return h, uint16(n), nil
}

// resolveServers turns Config.Servers into a list of distinct addresses
// (IP and port; the same IP with another port is another server). Host
// names contribute up to 2 addresses. Unresolvable entries are logged and
// skipped; the error says so if nothing is left.
func resolveServers(ctx context.Context, specs []string, log *slog.Logger) ([]*server, error) {
	var out []*server
	seen := make(map[netip.AddrPort]bool)
	var problems []string
	add := func(a netip.AddrPort) {
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		if seen[a] || len(out) >= MaxServers {
			return
		}
		seen[a] = true
		out = append(out, newServer(a, false))
	}
	for _, entry := range specs {
		for _, spec := range strings.Fields(entry) {
			host, port, err := parseHostSpec(spec)
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			if a, err := netip.ParseAddr(host); err == nil {
				add(netip.AddrPortFrom(a, port))
				continue
			}
			addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
			if err != nil || len(addrs) == 0 {
				problems = append(problems, fmt.Sprintf("cannot resolve %q: %v", host, err))
				log.Warn("dnbd3: cannot resolve server", "host", host, "err", err)
				continue
			}
			for k, a := range addrs {
				if k == 2 {
					break
				}
				add(netip.AddrPortFrom(a, port))
			}
		}
	}
	if len(out) == 0 {
		if len(problems) == 0 {
			problems = append(problems, "empty server list")
		}
		return nil, fmt.Errorf("no usable server address (%s): %w", strings.Join(problems, "; "), ErrNoServer)
	}
	return out, nil
}

// serverKeys lists the dial addresses of a server list, for messages.
func serverKeys(list []*server) string {
	keys := make([]string, len(list))
	for i, s := range list {
		keys[i] = s.key
	}
	return "[" + strings.Join(keys, " ") + "]"
}

// ResolveServers parses and resolves server specs with the same rules as
// Config.Servers (space-separated entries, default port 5003, up to 2
// addresses per host name, duplicates removed) and returns the dial
// addresses ("ip:port"), at most MaxServers.
func ResolveServers(ctx context.Context, specs []string) ([]string, error) {
	list, err := resolveServers(ctx, specs, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = s.key
	}
	return out, nil
}
