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

// peerCounts returns the DNBD3 connections that selected an image: clients
// and servers (proxies replicating from this one).
func (s *Server) peerCounts() (clients, servers int) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	for cc := range s.clients {
		if cc.isServer.Load() {
			servers++
		} else {
			clients++
		}
	}
	return clients, servers
}
