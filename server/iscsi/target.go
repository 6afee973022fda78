package iscsi

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"
)

// Disk is one image as a logical unit: read-only, 512-byte logical
// blocks.
type Disk interface {
	// Size returns the size in bytes, a multiple of 512.
	Size() int64
	// Name and RID identify the image (INQUIRY shows them as product and
	// revision).
	Name() string
	RID() uint16
	// WWN returns the image's World Wide Name (VPD page 0x83).
	WWN() uint64
	// Read makes the n bytes at off readable and returns them as Data. On
	// a proxy it waits until absent blocks arrived from the uplink; ctx
	// ends the wait. An error wrapping ErrMedium means the range cannot
	// be read (MEDIUM ERROR for the initiator).
	Read(ctx context.Context, off, n int64) (Data, error)
	// Ready reports whether Read of the range would return at once (the
	// data is local).
	Ready(off, n int64) bool
	// Close releases the disk when the session ends.
	Close()
}

// Data is a readable range of a Disk, from offset 0 to its length.
type Data interface {
	// SendTo writes hdr and then the n bytes at off to c, without a copy
	// where the data is in a file.
	SendTo(c net.Conn, hdr []byte, off, n int64) error
	// ReadAt copies the bytes at off into p.
	ReadAt(p []byte, off int64) (int, error)
}

// Backend gives the target its disks.
type Backend interface {
	// Open returns the disk a target name selects (ParseTargetName). An
	// error wrapping ErrTargetNotFound fails the login with "not found".
	Open(ctx context.Context, targetName string) (Disk, error)
	// Targets lists the target names for SendTargets=All.
	Targets() []string
}

// Errors a Backend returns.
var (
	ErrTargetNotFound = errors.New("iscsi: no such target")
	ErrMedium         = errors.New("iscsi: range cannot be read")
)

// Config configures a Target.
type Config struct {
	Backend Backend
	Logger  *slog.Logger
	// Timeout returns the client timeout (the server's clientTimeout):
	// the login must end within it, every write must progress within it,
	// and a connection silent for that long is pinged with a NOP-In; one
	// silent for 4 timeouts is closed, like an idle DNBD3 client.
	Timeout func() time.Duration
	// Sent, if set, counts data bytes sent to initiators.
	Sent func(n int64)
}

// Target is the iSCSI target of a server: it runs connections handed to
// it and keeps the list of sessions.
type Target struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	sessions map[*session]struct{}
	nextTSIH uint16
}

// New returns a Target.
func New(cfg Config) *Target {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Timeout == nil {
		cfg.Timeout = func() time.Duration { return 15 * time.Second }
	}
	return &Target{cfg: cfg, log: cfg.Logger, sessions: map[*session]struct{}{}}
}

// Serve runs one connection whose next bytes, read through r, are an
// iSCSI login. It returns when the connection ends; the caller closes c.
func (t *Target) Serve(ctx context.Context, c net.Conn, r *bufio.Reader) {
	s := newSession(t, c, r)
	defer s.close()
	defer t.unregister(s) // login registers it
	if err := s.login(ctx); err != nil {
		s.logEnd("login failed", err)
		return
	}
	s.logAt(slog.LevelInfo, "iSCSI session started", "initiator", s.p.initiatorName, "type", s.p.sessionType, "target", s.p.targetName)
	err := s.run()
	s.logEnd("iSCSI session ended", err)
}

// register adds s to the session list; a session of the same initiator
// and ISID for the same target is closed (session reinstatement: the
// initiator lost the old connection).
func (t *Target) register(s *session) {
	t.mu.Lock()
	var old []*session
	for o := range t.sessions {
		if o.isid == s.isid && o.p.initiatorName == s.p.initiatorName && o.p.targetName == s.p.targetName {
			old = append(old, o)
		}
	}
	t.sessions[s] = struct{}{}
	t.mu.Unlock()
	for _, o := range old {
		o.logAt(slog.LevelInfo, "closing session: the initiator logged in again with the same ISID")
		o.c.Close()
	}
}

func (t *Target) unregister(s *session) {
	t.mu.Lock()
	delete(t.sessions, s)
	t.mu.Unlock()
}

// newTSIH returns a session handle, never 0.
func (t *Target) newTSIH() uint16 {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nextTSIH++
	if t.nextTSIH == 0 {
		t.nextTSIH = 1
	}
	return t.nextTSIH
}

// SessionInfo describes a session for the server's client list.
type SessionInfo struct {
	Remote    netip.AddrPort
	Initiator string // InitiatorName
	Target    string // TargetName ("" for discovery sessions)
	Disk      Disk   // nil for discovery sessions
	BytesSent uint64 // data bytes sent
}

// Sessions returns the sessions in the full feature phase, oldest first.
func (t *Target) Sessions() []SessionInfo {
	t.mu.Lock()
	list := make([]*session, 0, len(t.sessions))
	for s := range t.sessions {
		list = append(list, s)
	}
	t.mu.Unlock()
	slices.SortFunc(list, func(a, b *session) int { return a.started.Compare(b.started) })
	out := make([]SessionInfo, len(list))
	for i, s := range list {
		out[i] = SessionInfo{Remote: s.remote, Initiator: s.p.initiatorName, Target: s.p.targetName,
			Disk: s.disk, BytesSent: s.bytesSent.Load()}
	}
	return out
}

// isClosed reports errors that only mean the initiator went away.
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
