package server

import "fmt"

// StatusLine is a one-line summary for systemd's STATUS= (shown by
// `systemctl status`): "serving 12 images, 340 clients".
func (s *Server) StatusLine() string {
	s.connMu.Lock()
	clients := len(s.clients)
	s.connMu.Unlock()
	return fmt.Sprintf("serving %d images, %d clients", len(s.store.List()), clients)
}
