package client

import (
	"slices"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// learnServers merges the entries of a GET_SERVERS reply into the server
// list (at most MaxServers). An entry with failures == 0 adds a server; a
// non-zero count removes a learned one (the kernel client's semantics).
// Servers given in Config.Servers are never removed; neither is the
// active one.
func (i *Image) learnServers(list []protocol.ServerEntry) {
	i.mu.Lock()
	defer i.mu.Unlock()
	for _, e := range list {
		a := e.Addr
		if !a.Addr().IsValid() || a.Port() == 0 || a.Addr().IsUnspecified() {
			continue
		}
		s := newServer(a, true)
		if slices.Contains(i.removed, s.addr) {
			continue // RemoveServer took it out
		}
		idx := -1
		for k, old := range i.servers {
			if old.addr == s.addr {
				idx = k
				break
			}
		}
		if e.Failures != 0 {
			if idx >= 0 && i.servers[idx].learned && (i.active == nil || i.active.srv != i.servers[idx]) {
				i.servers = append(i.servers[:idx], i.servers[idx+1:]...)
				i.log.Debug("dnbd3: server removed by GET_SERVERS", "server", s.key)
			}
			continue
		}
		if idx >= 0 || len(i.servers) >= MaxServers {
			continue
		}
		i.servers = append(i.servers, s)
		i.log.Info("dnbd3: learned server", "server", s.key)
	}
}
