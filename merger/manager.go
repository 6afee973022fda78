package merger

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/uuid"

	"github.com/dnbd3go/dnbd3go/internal/fsutil"
	"github.com/dnbd3go/dnbd3go/protocol"
	"golang.org/x/sys/unix"
)

// Defaults of Config.
const (
	DefaultRetention           = 24 * time.Hour
	DefaultAbandonAfter        = 7 * 24 * time.Hour
	DefaultMaxConcurrentMerges = 2
	// DefaultMinFreeSpace is the value a command should give MinFreeSpace
	// unless told otherwise (in Config, 0 disables the check).
	DefaultMinFreeSpace int64 = 1 << 30
	// DefaultMaxSessions is the default of Config.MaxSessions.
	DefaultMaxSessions = 1000
	// DefaultMaxSessionsPerImage is the default of
	// Config.MaxSessionsPerImage.
	DefaultMaxSessionsPerImage = 50
	// DefaultMaxOpenSessions is the default of Config.MaxOpenSessions.
	DefaultMaxOpenSessions = 64
	// DefaultAbandonEmptyAfter is the default of Config.AbandonEmptyAfter.
	DefaultAbandonEmptyAfter = time.Hour
	// MinAutoQuota is the smallest automatic session quota (see
	// Config.SessionQuota).
	MinAutoQuota int64 = 1 << 30
)

// MaxImageSize is the largest newFileSize a merge accepts: the COW
// format addresses 10^12 bytes (cowformat.MaxImageSize).
const MaxImageSize = cowformat.MaxImageSize

// Back-pressure delays suggested to clients (the reference client honours
// Retry-After up to 120 s).
const (
	busyRetryAfter     = 30 * time.Second
	diskRetryAfter     = 60 * time.Second
	shutdownRetryAfter = 10 * time.Second
	filesRetryAfter    = 10 * time.Second
	sessionsRetryAfter = 60 * time.Second
)

// Config configures a Manager.
type Config struct {
	// WorkingDirectory holds one directory per session (see session.go).
	WorkingDirectory string
	// OriginalImageDirectory holds the images sessions are based on,
	// <name>.r<revision> (names may contain '/').
	OriginalImageDirectory string
	// DestinationDirectory receives the merged revisions. It is usually
	// dnbd3-server's basePath, and often the same directory as
	// OriginalImageDirectory.
	DestinationDirectory string

	// Retention is how long Done and Failed sessions are kept after they
	// finished (default 24h).
	Retention time.Duration
	// AbandonAfter is how long an Active session may go without uploads
	// before it is deleted (default 7 days).
	AbandonAfter time.Duration
	// SweepInterval is how often sessions are checked against Retention
	// and AbandonAfter (default a tenth of the smaller one, between 1 s
	// and 10 min).
	SweepInterval time.Duration
	// MaxConcurrentMerges bounds the merges that run at once (default 2).
	// A merge request beyond it gets a *BackPressureError.
	MaxConcurrentMerges int
	// MinFreeSpace is the free space (bytes) an upload must leave in
	// WorkingDirectory's file system and a merge in
	// DestinationDirectory's; otherwise they get a *BackPressureError.
	// 0 disables the check; commands should default to
	// DefaultMinFreeSpace.
	MinFreeSpace int64
	// MaxSessions bounds the sessions kept, in any state (finished ones
	// count until Retention deletes them); Create beyond it gets a
	// *BackPressureError. Default DefaultMaxSessions.
	MaxSessions int
	// MaxSessionsPerImage bounds the sessions of one image name (all
	// revisions, any state), the same way. Default
	// DefaultMaxSessionsPerImage.
	MaxSessionsPerImage int
	// MaxOpenSessions bounds the sessions whose uploads (two files,
	// two descriptors) are open at once; the least recently used idle
	// ones are closed to make room, and when every open one is busy an
	// upload gets a *BackPressureError. Sessions being merged may exceed
	// it (MaxConcurrentMerges bounds them). Default
	// DefaultMaxOpenSessions.
	MaxOpenSessions int
	// SessionQuota bounds the uploads one session may hold, in bytes:
	// at most SessionQuota/ClusterSize (rounded up) distinct clusters,
	// each taking at most ClusterSize on disk (re-uploads replace). 0
	// means automatic: twice the size of the session's original image,
	// at least MinAutoQuota.
	SessionQuota int64
	// AbandonEmptyAfter is how long an Active session that never
	// received an upload is kept (default DefaultAbandonEmptyAfter, at
	// most AbandonAfter).
	AbandonEmptyAfter time.Duration
	// CopyMethod selects how a merge copies the original (default
	// CopyAuto: reflink, else copy_file_range, else read/write).
	CopyMethod CopyMethod
	// Logger receives the service's log (default: discarded).
	Logger *slog.Logger
}

// Manager is the merger service's core: it implements Service with
// sessions that survive restarts and crashes, and merges them into new
// revisions (see Merge). Create one with NewManager, call Start, and
// Close it when done. Its methods are safe for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context // cancelled by Close; merges and sweeps run under it
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// mergeSlots holds a token per running merge.
	mergeSlots chan struct{}

	lock *os.File // flock on WorkingDirectory/.lock: one Manager per directory

	mu       sync.Mutex
	sessions map[string]*session
	images   map[string]int // sessions (and creates in progress) by image name
	creating int            // creates in progress, not yet in sessions
	started  bool
	closed   bool

	// Open stores, least recently used at the back (see openstores.go).
	openMu    sync.Mutex
	openLRU   list.List // of *session
	openCount int       // stores open or being opened

	// mergeRetry is how long a merge that ran out of file descriptors
	// pauses before it is tried again.
	mergeRetry time.Duration

	stats *mergeStats // Prometheus counters (metrics.go)

	// installMu serialises moving merged revisions into place (their CRC
	// list, then the image; install.go), so that a merge that loses the
	// race for a revision never replaces the winner's list.
	installMu sync.Mutex

	// Test seams.
	now  func() time.Time
	hook func(point, uuid string) error // called at the crash points of a merge
}

var _ Service = (*Manager)(nil)

// withDefaults checks the directories (made absolute) and the limits, and
// fills in the defaults of the settings left zero.
func (cfg Config) withDefaults() (Config, error) {
	for _, d := range []struct{ name, path string }{
		{"WorkingDirectory", cfg.WorkingDirectory},
		{"OriginalImageDirectory", cfg.OriginalImageDirectory},
		{"DestinationDirectory", cfg.DestinationDirectory},
	} {
		if d.path == "" {
			return cfg, fmt.Errorf("merger: %s is not set", d.name)
		}
		st, err := os.Stat(d.path)
		if err != nil {
			return cfg, fmt.Errorf("%s: %w (create the directory or fix the configuration)", d.name, err)
		}
		if !st.IsDir() {
			return cfg, fmt.Errorf("merger: %s %s is not a directory", d.name, d.path)
		}
	}
	for _, p := range []*string{&cfg.WorkingDirectory, &cfg.OriginalImageDirectory, &cfg.DestinationDirectory} {
		var err error
		if *p, err = filepath.Abs(*p); err != nil {
			return cfg, fmt.Errorf("absolute path of %q: %w", *p, err)
		}
	}
	if cfg.Retention <= 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.AbandonAfter <= 0 {
		cfg.AbandonAfter = DefaultAbandonAfter
	}
	if cfg.AbandonEmptyAfter <= 0 {
		cfg.AbandonEmptyAfter = DefaultAbandonEmptyAfter
	}
	cfg.AbandonEmptyAfter = min(cfg.AbandonEmptyAfter, cfg.AbandonAfter)
	if cfg.SweepInterval <= 0 {
		cfg.SweepInterval = min(max(min(cfg.Retention, cfg.AbandonEmptyAfter)/10, time.Second), 10*time.Minute)
	}
	if cfg.MaxConcurrentMerges <= 0 {
		cfg.MaxConcurrentMerges = DefaultMaxConcurrentMerges
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultMaxSessions
	}
	if cfg.MaxSessionsPerImage <= 0 {
		cfg.MaxSessionsPerImage = DefaultMaxSessionsPerImage
	}
	if cfg.MaxOpenSessions <= 0 {
		cfg.MaxOpenSessions = DefaultMaxOpenSessions
	}
	if cfg.SessionQuota < 0 {
		return cfg, fmt.Errorf("merger: negative SessionQuota %d (0 is automatic)", cfg.SessionQuota)
	}
	if !cfg.CopyMethod.valid() {
		return cfg, fmt.Errorf("merger: unknown copy method %q (use %q, %q, %q or empty for automatic)", cfg.CopyMethod, CopyClone, CopyRange, CopyStream)
	}
	return cfg, nil
}

// NewManager checks cfg and loads the sessions found in
// cfg.WorkingDirectory, so that they answer at once; interrupted merges
// resume when Start is called.
func NewManager(cfg Config) (*Manager, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lock, err := lockDir(cfg.WorkingDirectory)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		lock:       lock,
		cfg:        cfg,
		log:        log,
		ctx:        ctx,
		cancel:     cancel,
		mergeSlots: make(chan struct{}, cfg.MaxConcurrentMerges),
		sessions:   make(map[string]*session),
		images:     make(map[string]int),
		mergeRetry: 30 * time.Second,
		now:        time.Now,
		stats:      newMergeStats(),
	}
	if err := m.loadSessions(); err != nil {
		cancel()
		lock.Close()
		return nil, err
	}
	return m, nil
}

// lockFileName is the lock file in WorkingDirectory.
const lockFileName = ".lock"

// lockDir takes an exclusive lock on dir, so that two merger processes
// (or two Managers) never work on the same sessions.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock WorkingDirectory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("merger: WorkingDirectory %s is in use by another merger (stop it, or configure another directory)", dir)
		}
		return nil, fmt.Errorf("lock WorkingDirectory: %w", err)
	}
	return f, nil
}

// Start resumes the merges a crash or shutdown interrupted (see
// recovery.go) and starts the retention sweeps, which run until ctx is
// cancelled or the Manager is closed. It returns once recovery has been
// scheduled.
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return errors.New("merger: Start after Close")
	}
	if m.started {
		m.mu.Unlock()
		return errors.New("merger: Start called twice")
	}
	m.started = true
	m.mu.Unlock()
	m.recover()
	m.wg.Add(1)
	go m.sweepLoop(ctx)
	return nil
}

// Close stops the Manager: it waits for uploads in flight, interrupts
// running merges (they resume on the next Start; their state on disk
// stays Copying or Merging) and closes every session's files. Calls
// after Close get a *BackPressureError.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	all := m.allSessions() // complete: Create adds none once closed is set
	for _, s := range all {
		s.uploadMu.Lock()
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.uploadMu.Unlock()
	}
	m.cancel()
	m.wg.Wait()
	var errs []error
	for _, s := range all {
		s.mu.Lock()
		errs = append(errs, m.closeStoreLocked(s))
		s.mu.Unlock()
	}
	errs = append(errs, m.lock.Close()) // releases the flock
	return errors.Join(errs...)
}

// allSessions returns the sessions, in no particular order.
func (m *Manager) allSessions() []*session {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Collect(maps.Values(m.sessions))
}

// errShuttingDown is returned for calls during and after Close.
func errShuttingDown() error {
	return &BackPressureError{RetryAfter: shutdownRetryAfter, Reason: "the merger service is shutting down"}
}

// lookup returns the session with the given id.
func (m *Manager) lookup(id string) (*session, error) {
	canon, ok := uuid.Parse(id)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errShuttingDown()
	}
	s := m.sessions[canon]
	if !ok || s == nil {
		return nil, fmt.Errorf("%w: no session %q (it never existed, or it finished or was abandoned and was deleted)", ErrSessionNotFound, id)
	}
	return s, nil
}

// usableLocked checks, with s.mu held, that s was neither deleted nor
// closed.
func (s *session) usableLocked() error {
	switch {
	case s.deleted:
		return fmt.Errorf("%w: session %s was deleted", ErrSessionNotFound, s.meta.UUID)
	case s.closed:
		return errShuttingDown()
	}
	return nil
}

// originalPath returns the path of revision rev of name in
// OriginalImageDirectory (name is valid).
func (m *Manager) originalPath(name string, rev int) string {
	return filepath.Join(m.cfg.OriginalImageDirectory, name+".r"+strconv.Itoa(rev))
}

// destPath returns the path of revision rev of name in
// DestinationDirectory (name is valid).
func (m *Manager) destPath(name string, rev int) string {
	return filepath.Join(m.cfg.DestinationDirectory, name+".r"+strconv.Itoa(rev))
}

// validImageName reports whether name may name a session's image: it must
// satisfy protocol.ValidImageName and be canonical (path.Clean leaves it
// unchanged: no "a//b"), so that two spellings never stand for one image
// file - neither here (where they would count as different images) nor in
// dnbd3-server, which refuses such names.
func validImageName(name string) bool {
	return protocol.ValidImageName(name) && path.Clean(name) == name
}

// Create starts a session for revision revision of imageName. The name
// must satisfy validImageName (ErrInvalidName), bitfieldSize
// must be BitfieldSize and the revision in [1, 65534] (ErrBadRequest),
// and <OriginalImageDirectory>/<imageName>.r<revision> must be a regular
// file (ErrImageNotFound). The original is not copied: the merge reads it.
func (m *Manager) Create(imageName string, revision, bitfieldSize int) (SessionInfo, error) {
	if !validImageName(imageName) {
		return SessionInfo{}, fmt.Errorf("%w %q: names must not be empty, start with '/' or '.', end with '/', contain \"/.\" or \"//\"", ErrInvalidName, imageName)
	}
	if bitfieldSize != cowformat.BitfieldSize {
		return SessionInfo{}, fmt.Errorf("%w: bitfieldSize %d, the merger only supports %d (bytes per 1.25 MiB cluster)", ErrBadRequest, bitfieldSize, cowformat.BitfieldSize)
	}
	if revision < 1 || revision >= 65535 {
		return SessionInfo{}, fmt.Errorf("%w: revision %d: it must be between 1 and 65534 (the merge creates revision+1, and dnbd3 revisions end at 65535)", ErrBadRequest, revision)
	}
	src := m.originalPath(imageName, revision)
	st, err := os.Stat(src)
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		return SessionInfo{}, fmt.Errorf("%w: %s.r%d is not in %s", ErrImageNotFound, imageName, revision, m.cfg.OriginalImageDirectory)
	case err != nil:
		return SessionInfo{}, fmt.Errorf("check the original image: %w", err)
	case !st.Mode().IsRegular():
		return SessionInfo{}, fmt.Errorf("%w: %s is not a regular file", ErrImageNotFound, src)
	}
	if err := m.reserveSession(imageName); err != nil {
		return SessionInfo{}, err
	}
	if err := m.checkSpace(m.cfg.WorkingDirectory, 0, "a new session"); err != nil {
		m.unreserveSession(imageName)
		return SessionInfo{}, err
	}

	id := uuid.New()
	now := m.now()
	s := &session{
		dir: filepath.Join(m.cfg.WorkingDirectory, id),
		meta: sessionFile{
			Version:          sessionVersion,
			UUID:             id,
			ImageName:        imageName,
			OriginalRevision: revision,
			OriginalSize:     st.Size(),
			NewRevision:      -1,
			BitfieldSize:     bitfieldSize,
			State:            StateActive,
			Created:          now,
		},
		lastUpload: now,
		counted:    true, // no clusters yet
	}
	if err := m.createSessionFiles(s, now); err != nil {
		removeCreated(s.dir)
		m.unreserveSession(imageName)
		if bp := resourceError(err, "creating a session"); bp != nil {
			m.log.Warn("cannot create a session", "image", imageName, "revision", revision, "err", err)
			return SessionInfo{}, bp
		}
		return SessionInfo{}, fmt.Errorf("create session directory in %s: %w", m.cfg.WorkingDirectory, err)
	}
	m.mu.Lock()
	m.creating--
	if m.closed {
		m.images[imageName]--
		m.mu.Unlock()
		removeCreated(s.dir)
		return SessionInfo{}, errShuttingDown()
	}
	m.sessions[id] = s
	m.mu.Unlock()
	m.log.Info("session created", "session", id, "image", imageName, "revision", revision)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info(), nil
}

// reserveSession counts a session of image that is being created against
// MaxSessions and MaxSessionsPerImage, or returns a *BackPressureError.
// unreserveSession undoes it if the create fails.
func (m *Manager) reserveSession(image string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return errShuttingDown()
	case len(m.sessions)+m.creating >= m.cfg.MaxSessions:
		return &BackPressureError{RetryAfter: sessionsRetryAfter, Reason: fmt.Sprintf(
			"the merger holds %d sessions, its maximum (finished ones count until their retention ends)", m.cfg.MaxSessions)}
	case m.images[imageKey(image)] >= m.cfg.MaxSessionsPerImage:
		return &BackPressureError{RetryAfter: sessionsRetryAfter, Reason: fmt.Sprintf(
			"the merger holds %d sessions of %s, the maximum per image (finished ones count until their retention ends)", m.cfg.MaxSessionsPerImage, image)}
	}
	m.creating++
	m.images[imageKey(image)]++
	return nil
}

func (m *Manager) unreserveSession(image string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.creating--
	m.forgetImageLocked(image)
}

// forgetImageLocked takes one session of image off the count (m.mu held).
func (m *Manager) forgetImageLocked(image string) {
	k := imageKey(image)
	if m.images[k]--; m.images[k] <= 0 {
		delete(m.images, k)
	}
}

// imageKey is the key of an image name in Manager.images: the canonical
// spelling, so that sessions created before names had to be canonical
// count with their image.
func imageKey(name string) string { return path.Clean(name) }

// createSessionFiles creates a new session's directory: the empty store
// first, session.json last (so a directory with a session.json always
// has its store), then syncs the working directory. It leaves every
// file closed.
func (m *Manager) createSessionFiles(s *session, now time.Time) error {
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return err
	}
	if err := createStoreFiles(s.dir); err != nil {
		return err
	}
	if err := s.persist(now); err != nil { // syncs s.dir
		return err
	}
	return fsutil.SyncDir(m.cfg.WorkingDirectory)
}

// removeCreated deletes what createSessionFiles made, session.json first
// (a directory without it is removed at the next start, see
// loadSessions). It removes each file by name, which needs no file
// descriptor: a create that failed because the process ran out of them
// still leaves nothing behind.
func removeCreated(dir string) {
	for _, name := range []string{sessionFileName, sessionFileName + ".tmp", journalFileName, dataFileName} {
		os.Remove(filepath.Join(dir, name))
	}
	os.Remove(dir)
}

// resourceError returns a *BackPressureError if err means the process
// ran out of file descriptors or the disk is full (conditions that pass),
// else nil.
func resourceError(err error, what string) error {
	switch {
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		return &BackPressureError{RetryAfter: filesRetryAfter, Reason: what + ": the merger has too many files open (" + err.Error() + ")"}
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return &BackPressureError{RetryAfter: diskRetryAfter, Reason: what + ": no space left (" + err.Error() + ")"}
	}
	return nil
}

// validateUpdate checks an upload's cluster index and body length.
func validateUpdate(u *Update) error {
	if u.Cluster < 0 || u.Cluster >= cowformat.MaxClusters {
		return fmt.Errorf("%w: cluster index %d is outside [0, %d)", ErrBadRequest, u.Cluster, cowformat.MaxClusters)
	}
	n := popcount(&u.Bitfield)
	if u.Full {
		if len(u.Blocks) != cowformat.ClusterSize {
			return fmt.Errorf("%w: a full cluster upload has %d data bytes, want %d", ErrBadRequest, len(u.Blocks), cowformat.ClusterSize)
		}
		return nil
	}
	if len(u.Blocks) != n*cowformat.BlockSize {
		return fmt.Errorf("%w: the bitfield has %d bits set, so the body must hold %d data bytes (4096 per set bit, ascending), not %d",
			ErrBadRequest, n, n*cowformat.BlockSize, len(u.Blocks))
	}
	return nil
}

// acceptsUploadsLocked checks, with s.mu held, that s takes uploads.
func (s *session) acceptsUploadsLocked() error {
	if err := s.usableLocked(); err != nil {
		return err
	}
	if s.meta.State != StateActive {
		return fmt.Errorf("%w: session %s is %s", ErrSessionClosed, s.meta.UUID, s.meta.State)
	}
	return nil
}

// CanUpload reports whether the session exists and accepts uploads, so
// that the HTTP layer refuses an upload before it reads (and buffers) its
// body. It opens nothing.
func (m *Manager) CanUpload(id string) error {
	s, err := m.lookup(id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.acceptsUploadsLocked()
}

// Update stores one uploaded cluster durably, replacing the cluster's
// previous upload: when it returns nil, the blocks and the journal record
// pointing at them are synced to disk. Errors: ErrSessionNotFound,
// ErrBadRequest (cluster index out of range, body length not 4096 x
// popcount(bitfield), or not ClusterSize with Full), ErrSessionClosed
// (the session is merging or finished), ErrQuotaExceeded (a new cluster
// beyond the session's quota), *BackPressureError (disk nearly full, out
// of file descriptors, every open session busy, or shutting down);
// anything else is an I/O error on the server. It does not keep u.Blocks.
func (m *Manager) Update(id string, u Update) error {
	s, err := m.lookup(id)
	if err != nil {
		return err
	}
	if err := validateUpdate(&u); err != nil {
		return err
	}
	s.uploadMu.RLock()
	defer s.uploadMu.RUnlock()
	s.mu.Lock()
	if err := s.acceptsUploadsLocked(); err != nil {
		s.mu.Unlock()
		return err
	}
	st, err := m.openStoreLocked(s, false)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if err := m.checkSpace(m.cfg.WorkingDirectory, int64(popcount(&u.Bitfield))*cowformat.BlockSize, "upload"); err != nil {
		return err
	}
	if err := st.put(&u); err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return &BackPressureError{RetryAfter: diskRetryAfter, Reason: fmt.Sprintf("no space left for uploads in %s", m.cfg.WorkingDirectory)}
		}
		if errors.Is(err, ErrQuotaExceeded) {
			return err
		}
		m.log.Error("upload failed", "session", id, "cluster", u.Cluster, "err", err)
		return fmt.Errorf("store cluster %d of session %s: %w", u.Cluster, id, err)
	}
	s.mu.Lock()
	s.lastUpload = m.now()
	s.uploaded = true
	s.mu.Unlock()
	return nil
}

// checkSpace returns a *BackPressureError if writing need more bytes
// into dir's file system would leave less than MinFreeSpace free.
func (m *Manager) checkSpace(dir string, need int64, what string) error {
	if m.cfg.MinFreeSpace <= 0 {
		return nil
	}
	free, err := freeSpace(dir)
	if err != nil {
		return fmt.Errorf("free space for %s: %w", what, err)
	}
	if free < m.cfg.MinFreeSpace+need {
		return &BackPressureError{
			RetryAfter: diskRetryAfter,
			Reason: fmt.Sprintf("%s needs %d bytes in %s, which has %d bytes free and must keep %d free",
				what, need, dir, free, m.cfg.MinFreeSpace),
		}
	}
	return nil
}

// Status reports a session (ErrSessionNotFound if there is none).
func (m *Manager) Status(id string) (SessionInfo, error) {
	s, err := m.lookup(id)
	if err != nil {
		return SessionInfo{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleted {
		return SessionInfo{}, s.usableLocked()
	}
	if s.meta.State == StateActive && s.st == nil && !s.counted && !s.closed {
		if _, err := m.openStoreLocked(s, false); err != nil {
			m.log.Warn("status: cannot load the session's uploads", "session", id, "err", err)
		}
	}
	return s.info(), nil
}

// TopModified returns up to n of the session's clusters with the most
// uploads, the most modified first. It returns nil (and no error) for a
// session that is Done, whose uploads are deleted (the reference answers
// 204 then). A negative n is ErrBadRequest.
func (m *Manager) TopModified(id string, n int) ([]ClusterCount, error) {
	if n < 0 {
		return nil, fmt.Errorf("%w: amount %d is negative", ErrBadRequest, n)
	}
	s, err := m.lookup(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usableLocked(); err != nil {
		return nil, err
	}
	if s.meta.State == StateDone {
		return nil, nil
	}
	st, err := m.openStoreLocked(s, false)
	if err != nil {
		return nil, err
	}
	return st.topModified(n), nil
}
