package merger

import "fmt"

// StatusLine is a one-line summary for systemd's STATUS= (shown by
// `systemctl status`): "3 sessions: 2 active, 1 merging".
func (m *Manager) StatusLine() string {
	var active, merging int
	all := m.allSessions()
	for _, s := range all {
		s.mu.Lock()
		switch s.meta.State {
		case StateActive:
			active++
		case StateCopying, StateMerging:
			merging++
		}
		s.mu.Unlock()
	}
	return fmt.Sprintf("%d sessions: %d active, %d merging", len(all), active, merging)
}
