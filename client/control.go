package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Runtime control of the server list, like the reference kernel client's
// dnbd3-client -A (add), -R (remove) and -s (switch):
//
//   - AddServer adds a server that failover and RTT probing then consider.
//     It counts as a given server: GET_SERVERS never removes it.
//   - RemoveServer forgets a server; GET_SERVERS does not bring it back
//     (AddServer does). Removing the current server fails the Image over
//     to another at once (its reads are re-sent there, nothing fails).
//   - SwitchServer connects to a server and makes it the current one; the
//     Image then stays on it ("pinned": RTT probing measures but does not
//     switch away) until its connection fails or Unpin is called.
//
// The list stays bounded by MaxServers and the remembered removals by
// maxRemoved.

// ErrServerListFull means the Image already knows MaxServers servers.
var ErrServerListFull = errors.New("client: server list full")

// ErrUnknownServer means the named server is not in the server list.
var ErrUnknownServer = errors.New("client: not a known server")

// maxRemoved bounds the addresses RemoveServer keeps from being learned
// again; the oldest is forgotten first.
const maxRemoved = 4 * MaxServers

// ParseServerSpec checks one server argument of the runtime controls:
// exactly one "host", "host:port", "[v6]:port" or bare IPv6 address, at
// most 255 bytes, printable. It does not resolve host names.
func ParseServerSpec(spec string) (host string, port uint16, err error) {
	if spec == "" || len(spec) > 255 || strings.ContainsFunc(spec, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
		return "", 0, fmt.Errorf("client: bad server %q: want one host, host:port or [v6]:port (printable, at most 255 bytes)", spec)
	}
	return parseHostSpec(spec)
}

// resolveOne resolves one server argument to its addresses (up to 2 for a
// host name), with IPv4-mapped addresses unmapped as in the server list.
func resolveOne(ctx context.Context, spec string) ([]netip.AddrPort, error) {
	if _, _, err := ParseServerSpec(spec); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	list, err := resolveServers(ctx, []string{spec}, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	out := make([]netip.AddrPort, len(list))
	for k, s := range list {
		out[k] = s.addr
	}
	return out, nil
}

// indexLocked returns the position of address a in the server list, -1 if
// it is not there.
func (i *Image) indexLocked(a netip.AddrPort) int {
	return slices.IndexFunc(i.servers, func(s *server) bool { return s.addr == a })
}

// AddServer adds the server(s) spec names (a host name may give two
// addresses) to the server list and returns the addresses added; one
// already known is not added again and not an error. The list holds at
// most MaxServers: ErrServerListFull when nothing fits.
func (i *Image) AddServer(ctx context.Context, spec string) ([]string, error) {
	addrs, err := resolveOne(ctx, spec)
	if err != nil {
		return nil, err
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.closed {
		return nil, ErrClosed
	}
	var added []string
	for _, a := range addrs {
		if k := i.indexLocked(a); k >= 0 {
			i.servers[k].added = true
			continue
		}
		s, err := i.addLocked(a)
		if err != nil {
			return added, err
		}
		added = append(added, s.key)
	}
	if len(added) > 0 {
		i.probeAt = time.Time{} // measure it soon
		i.probeRounds = 0
		i.poke()
	}
	return added, nil
}

// RemoveServer removes the server(s) spec names from the server list and
// returns the addresses removed. Removing the current server makes the
// Image fail over to another at once; the last server cannot be removed.
func (i *Image) RemoveServer(ctx context.Context, spec string) ([]string, error) {
	addrs, err := resolveOne(ctx, spec)
	if err != nil {
		return nil, err
	}
	i.mu.Lock()
	defer i.unlock()
	if i.closed {
		return nil, ErrClosed
	}
	var gone []*server
	for _, s := range i.servers {
		if slices.Contains(addrs, s.addr) {
			gone = append(gone, s)
		}
	}
	if len(gone) == 0 {
		return nil, fmt.Errorf("%w: %s (known: %s)", ErrUnknownServer, spec, serverKeys(i.servers))
	}
	if len(gone) == len(i.servers) {
		return nil, fmt.Errorf("client: %s is the only server: add another first", spec)
	}
	var removed []string
	for _, s := range gone {
		i.servers = slices.DeleteFunc(i.servers, func(o *server) bool { return o == s })
		i.rememberRemovedLocked(s.addr)
		removed = append(removed, s.key)
		if i.pinned == s {
			i.pinned = nil
		}
		i.log.Info("dnbd3: server removed", "server", s.key)
		if c := i.active; c != nil && c.srv == s {
			i.dropLocked(c, nil, time.Now()) // fail over now; not the server's fault
		}
	}
	return removed, nil
}

// rememberRemovedLocked keeps a from being learned again, within
// maxRemoved remembered addresses.
func (i *Image) rememberRemovedLocked(a netip.AddrPort) {
	if slices.Contains(i.removed, a) {
		return
	}
	if len(i.removed) >= maxRemoved {
		i.removed = slices.Delete(i.removed, 0, 1)
	}
	i.removed = append(i.removed, a)
}

// SwitchServer connects to the server spec names (added to the server
// list if it is not there yet), makes it the current server and pins it:
// RTT probing no longer switches away until the connection fails or Unpin
// is called. Reads in flight move to it and are re-sent; none fails. It
// returns the server's address.
func (i *Image) SwitchServer(ctx context.Context, spec string) (string, error) {
	addrs, err := resolveOne(ctx, spec)
	if err != nil {
		return "", err
	}
	srv, err := i.switchTarget(addrs[0])
	if err != nil {
		return "", err
	}
	d, err := handshake(ctx, i.cfg.Dial, srv, i.id, i.cfg.SelectFlags, i.cfg.FailoverConnectTimeout)
	if err != nil {
		i.mu.Lock()
		srv.fail(err, time.Now())
		i.mu.Unlock()
		return "", fmt.Errorf("switch to %s: %w", srv.key, err)
	}
	i.mu.Lock()
	defer i.unlock()
	if i.closed {
		d.close()
		return "", ErrClosed
	}
	if i.indexLocked(srv.addr) < 0 {
		d.close()
		return "", fmt.Errorf("client: %s was removed while switching to it", srv.key)
	}
	i.switches.Add(1)
	from := "(none)"
	if c := i.active; c != nil {
		from = c.srv.key
	}
	i.log.Info("dnbd3: switching server on request", "from", from, "to", srv.key)
	i.adoptLocked(d, "switch on request")
	i.pinned = srv
	i.probeInterval = i.cfg.ProbeAfterSwitch
	return srv.key, nil
}

// switchTarget returns the server of address a, adding it to the list if
// it is not there (ErrServerListFull if there is no room).
func (i *Image) switchTarget(a netip.AddrPort) (*server, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.closed {
		return nil, ErrClosed
	}
	if k := i.indexLocked(a); k >= 0 {
		return i.servers[k], nil
	}
	return i.addLocked(a)
}

// addLocked appends a server of address a (not in the list) as an added
// one and lets it be learned again; ErrServerListFull if there is no room.
func (i *Image) addLocked(a netip.AddrPort) (*server, error) {
	if len(i.servers) >= MaxServers {
		return nil, fmt.Errorf("%w (%d servers): remove one first", ErrServerListFull, MaxServers)
	}
	i.removed = slices.DeleteFunc(i.removed, func(r netip.AddrPort) bool { return r == a })
	s := newServer(a, false)
	s.added = true
	i.servers = append(i.servers, s)
	i.log.Info("dnbd3: server added", "server", s.key)
	return s, nil
}

// Unpin lets RTT probing choose the server again after SwitchServer. It
// reports whether a server was pinned.
func (i *Image) Unpin() bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	was := i.pinned != nil
	i.pinned = nil
	return was
}
