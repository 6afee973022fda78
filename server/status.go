package server

import "fmt"

// StatusLine is a one-line summary for systemd's STATUS= (shown by
// `systemctl status`): "serving 12 images, 340 clients", and on a proxy
// that reused previous revisions how much it fetched and reused:
// "serving 12 images, 340 clients; replicated 1.2 GiB fetched, 30.1 GiB
// reused".
func (s *Server) StatusLine() string {
	s.connMu.Lock()
	clients := len(s.clients)
	s.connMu.Unlock()
	line := fmt.Sprintf("serving %d images, %d clients", len(s.store.list()), clients)
	if r := s.bytesReused.Load(); r > 0 {
		line += fmt.Sprintf("; replicated %s fetched, %s reused", gib(s.bytesRecv.Load()), gib(r))
	}
	return line
}

// gib formats a byte count in GiB with one decimal.
func gib(n uint64) string { return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30)) }

// peerCounts returns the connections that use an image: clients (DNBD3
// and NBD-mode connections that selected one, and iSCSI sessions logged
// in to one; discovery sessions use none) and servers (proxies
// replicating from this one). The RPC's stats and /status.json both count
// with it.
func (s *Server) peerCounts() (clients, servers int) {
	s.connMu.Lock()
	for cc := range s.clients {
		if cc.isServer.Load() {
			servers++
		} else {
			clients++
		}
	}
	s.connMu.Unlock()
	for _, si := range s.iscsi.Sessions() {
		if si.Disk != nil {
			clients++
		}
	}
	return clients, servers
}
