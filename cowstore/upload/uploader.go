package upload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// States of the upload, as written to the status file's state= line.
const (
	// StateActive is the content of a freshly created status file.
	StateActive = "active"
	// StateBackgroundUpload: attached, uploading clusters once they are old
	// enough.
	StateBackgroundUpload = "backgroundUpload"
	// StateUploading: detaching, the final flush runs.
	StateUploading = "uploading"
	// StateDone: the final flush (and merge request) has ended.
	StateDone = "done"
)

// Config tunes an Uploader. Zero fields take the defaults in their docs.
type Config struct {
	// MinDelay: a cluster is uploaded while attached only once its last
	// change is at least this old. 0 means the default, 60 s (the
	// reference's COW_MIN_UPLOAD_DELAY); a negative value means no delay
	// (changed clusters go out with the next pass). The final flush
	// ignores it.
	MinDelay time.Duration
	// Parallel is the number of uploads at a time while attached
	// (default 2).
	Parallel int
	// FinalParallel is the number of uploads at a time in the final flush
	// (default 10).
	FinalParallel int
	// PassInterval is the pause between two passes over the dirty clusters
	// while attached (default 2 s).
	PassInterval time.Duration
	// StatusFile is the path of the session's status file; "" writes none.
	StatusFile string
	// StatsInterval is how often the status is written (default 5 s).
	StatsInterval time.Duration
	// StatsToLog logs the status at Info level every StatsInterval
	// (--cow-stats-stdout).
	StatsToLog bool
	// StatsOut, if set, receives the status every StatsInterval as the
	// status file's text (INI, section [General]) followed by an empty
	// line (--cow-stats-stdout prints it to stdout).
	StatsOut io.Writer
	// Logger receives the uploader's messages (default slog.Default()).
	Logger *slog.Logger
	// Now is the clock that decides whether a change is old enough and
	// times the status' upload speed (default time.Now). Pauses always use
	// real time.
	Now func() time.Time

	// BackPressureDelay is the pause after a 503 or 429 reply without a
	// usable Retry-After header (default 10 s).
	BackPressureDelay time.Duration
	// RetryBackoff is the first wait before retrying after failures in the
	// final flush and between merge attempts; it doubles each time up to
	// MaxBackoff (defaults 2 s and 30 s).
	RetryBackoff time.Duration
	// MaxBackoff caps RetryBackoff's doubling (default 30 s).
	MaxBackoff time.Duration
	// FinalRounds is how many rounds in a row the final flush may end with
	// dirty clusters and no successful upload before it gives up
	// (default 5).
	FinalRounds int
	// MergeAttempts is how often the merge request is tried (default 6).
	MergeAttempts int
	// ErrorLogInterval: at most one upload failure is logged per interval,
	// the others are counted (default 30 s).
	ErrorLogInterval time.Duration
}

// withDefaults fills in the zero fields.
func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(n *int, v int) {
		if *n <= 0 {
			*n = v
		}
	}
	switch {
	case c.MinDelay == 0:
		c.MinDelay = 60 * time.Second
	case c.MinDelay < 0:
		c.MinDelay = 0
	}
	defInt(&c.Parallel, 2)
	defInt(&c.FinalParallel, 10)
	def(&c.PassInterval, 2*time.Second)
	def(&c.StatsInterval, 5*time.Second)
	def(&c.BackPressureDelay, 10*time.Second)
	def(&c.RetryBackoff, 2*time.Second)
	def(&c.MaxBackoff, 30*time.Second)
	defInt(&c.FinalRounds, 5)
	defInt(&c.MergeAttempts, 6)
	def(&c.ErrorLogInterval, 30*time.Second)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// ErrFinished is returned by Run and Finish once Finish has been called.
var ErrFinished = errors.New("upload: the uploader has already finished")

// Uploader uploads a copy-on-write session's dirty clusters to a merger:
// in the background while the image is attached (Run) and all of them at
// detach (Finish). Its methods are safe for concurrent use.
type Uploader struct {
	src Source
	m   *MergerClient
	cfg Config
	log *slog.Logger

	sessMu sync.Mutex // serialises EnsureSession

	mu            sync.Mutex
	state         string
	finished      bool
	stopRun       context.CancelFunc // set while Run runs
	runDone       chan struct{}      // closed when that Run has ended
	throttleUntil time.Time          // real time
	lastErr       error
	lastErrAt     time.Time
	statusCreated bool

	active        atomic.Int64
	uploaded      atomic.Uint64
	bytes         atomic.Uint64
	failures      atomic.Uint64
	backPressured atomic.Uint64

	statusMu      sync.Mutex // serialises status writes
	lastStatBytes uint64
	lastStatTime  time.Time

	errLog    logLimiter // upload failures
	bpLog     logLimiter // back-pressure replies
	statusLog logLimiter // status file write errors
}

// New returns an Uploader for the overlay src and the merger m (not nil).
func New(src Source, m *MergerClient, cfg Config) *Uploader {
	cfg = cfg.withDefaults()
	u := &Uploader{
		src: src,
		m:   m,
		cfg: cfg,
		log: cfg.Logger,
	}
	u.errLog.every = cfg.ErrorLogInterval
	u.bpLog.every = cfg.ErrorLogInterval
	u.statusLog.every = cfg.ErrorLogInterval
	u.lastStatTime = cfg.Now()
	return u
}

// EnsureSession returns the session's merger id, creating a merger session
// for the overlay's image and revision first if it has none. To use an
// existing session (--upload-uuid), call Source.SetUUID before.
func (u *Uploader) EnsureSession(ctx context.Context) (string, error) {
	u.sessMu.Lock()
	defer u.sessMu.Unlock()
	if id := u.src.UUID(); id != "" {
		return id, nil
	}
	name, rid := u.src.ImageName(), u.src.RID()
	id, err := u.m.Create(ctx, name, rid)
	if err != nil {
		return "", err
	}
	if err := u.src.SetUUID(id); err != nil {
		return "", fmt.Errorf("store merger session id %s in the COW session: %w", id, err)
	}
	u.log.Info("merger session created", "uuid", id, "image", name, "rid", rid, "merger", u.m.URL())
	return id, nil
}

// Run uploads dirty clusters in the background until ctx ends or Finish is
// called: every PassInterval it uploads, at most Parallel at a time, the
// clusters whose last change is at least MinDelay old. It writes the status
// file (state backgroundUpload) every StatsInterval. It returns nil when
// stopped, after all its uploads and goroutines have ended; an upload
// cancelled that way leaves its cluster dirty.
func (u *Uploader) Run(ctx context.Context) error {
	u.mu.Lock()
	switch {
	case u.finished:
		u.mu.Unlock()
		return ErrFinished
	case u.stopRun != nil:
		u.mu.Unlock()
		return errors.New("upload: Run is already running")
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	u.stopRun, u.runDone = cancel, done
	u.state = StateBackgroundUpload
	u.mu.Unlock()

	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
		u.mu.Lock()
		u.stopRun = nil
		u.mu.Unlock()
		close(done)
	}()

	u.createStatusFile()
	if u.statusEnabled() {
		wg.Go(func() { u.statusLoop(runCtx, StateBackgroundUpload) })
	}
	for {
		wait := u.cfg.PassInterval + u.throttleLeft()
		if !sleep(runCtx, wait) {
			return nil
		}
		if u.throttleLeft() > 0 {
			continue
		}
		u.pass(runCtx, u.cfg.Parallel, false)
	}
}

// throttle pauses new uploads for d (real time), unless a longer pause is
// already set.
func (u *Uploader) throttle(d time.Duration) {
	until := time.Now().Add(d)
	u.mu.Lock()
	if until.After(u.throttleUntil) {
		u.throttleUntil = until
	}
	u.mu.Unlock()
}

// throttleLeft is how long new uploads are still paused.
func (u *Uploader) throttleLeft() time.Duration {
	u.mu.Lock()
	defer u.mu.Unlock()
	return max(time.Until(u.throttleUntil), 0)
}

// setState records the state shown in the status file and Stats.
func (u *Uploader) setState(s string) {
	u.mu.Lock()
	u.state = s
	u.mu.Unlock()
}

// noteFailure records err as the last error and logs it, rate-limited.
func (u *Uploader) noteFailure(err error) {
	now := u.cfg.Now()
	u.mu.Lock()
	u.lastErr, u.lastErrAt = err, now
	u.mu.Unlock()
	if ok, suppressed := u.errLog.allow(time.Now()); ok {
		u.log.Warn("upload to merger failed; will retry", "err", err, "suppressedSinceLastLog", suppressed)
	}
}

// sleep waits for d or until ctx ends; it reports whether ctx is still
// alive.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
