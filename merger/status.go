package merger

import "fmt"

// StatusLine is a one-line summary for systemd's STATUS= (shown by
// `systemctl status`): "3 sessions: 2 active, 1 merging".
func (m *Manager) StatusLine() string {
	count, total := m.stateCounts()
	return fmt.Sprintf("%d sessions: %d active, %d merging", total, count[StateActive], count[StateCopying]+count[StateMerging])
}
