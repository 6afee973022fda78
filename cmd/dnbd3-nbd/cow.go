package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/cowstore"
	"github.com/dnbd3go/dnbd3go/cowstore/upload"
	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/spf13/pflag"
)

// The engine runs local overlay requests inline (see nbdbridge.LocalHinter).
var _ nbdbridge.LocalHinter = (*cowstore.Overlay)(nil)

// cowFlags are the reference FUSE client's copy-on-write flags.
type cowFlags struct {
	newDir      string
	loadDir     string
	merger      string
	merge       bool
	uploadUUID  string
	statsFile   bool
	statsStdout bool
	uploadDelay time.Duration
	tokenFile   string
	caFile      string

	client   *upload.MergerClient // built by validate from -C and its options
	statsOut io.Writer            // where --cow-stats-stdout prints (the command's stdout)
}

func (c *cowFlags) register(fs *pflag.FlagSet) {
	fs.StringVarP(&c.newDir, "cow", "c", "", "start a new copy-on-write session in DIR: the device becomes writable")
	fs.StringVarP(&c.loadDir, "cow-load", "L", "", "load the copy-on-write session in DIR (also --loadcow)")
	fs.StringVarP(&c.merger, "merger", "C", "", "merger service that receives the changes: host:port or http(s)://host[:port] (also --cowServer)")
	fs.BoolVarP(&c.merge, "merge", "m", false, "on detach, after every change is uploaded, ask the merger to build the next revision")
	fs.StringVar(&c.uploadUUID, "upload-uuid", "", "use this merger session instead of creating one")
	fs.BoolVar(&c.statsFile, "cow-stats-file", false, "keep the upload status in DIR/status (also --cowStatFile)")
	fs.BoolVar(&c.statsStdout, "cow-stats-stdout", false, "print the upload status (the status file's text) to stdout every 5 s (also --cowStatStdout)")
	fs.DurationVar(&c.uploadDelay, "upload-delay", 60*time.Second, "upload a changed cluster once it is unchanged this long")
	fs.StringVar(&c.tokenFile, "merger-token-file", "", "file with a bearer token for the merger")
	fs.StringVar(&c.caFile, "merger-ca", "", "PEM file with the CA certificates of an https merger")
}

func (c *cowFlags) enabled() bool { return c.newDir != "" || c.loadDir != "" }

func (c *cowFlags) dir() string {
	if c.newDir != "" {
		return c.newDir
	}
	return c.loadDir
}

// validate checks the copy-on-write flags and builds the merger client, so
// that a bad -C, token file, CA file or --upload-uuid is reported before
// any session directory is touched.
func (c *cowFlags) validate() error {
	if err := c.checkCombinations(); err != nil {
		return err
	}
	if c.merger == "" {
		return nil
	}
	return c.newMergerClient()
}

// checkCombinations checks which COW flags need which others.
func (c *cowFlags) checkCombinations() error {
	switch {
	case c.newDir != "" && c.loadDir != "":
		return errors.New("-c (new session) and -L (load a session) exclude each other")
	case !c.enabled() && (c.merger != "" || c.merge || c.uploadUUID != "" || c.statsFile || c.statsStdout):
		return errors.New("-C, -m, --upload-uuid and --cow-stats-* need a copy-on-write session (-c DIR or -L DIR)")
	case c.merger == "" && (c.merge || c.uploadUUID != "" || c.tokenFile != "" || c.caFile != ""):
		return errors.New("-m, --upload-uuid, --merger-token-file and --merger-ca need the merger (-C URL)")
	case c.uploadDelay < 0:
		return errors.New("--upload-delay must not be negative")
	case len(c.uploadUUID) > upload.MaxUUIDLength || strings.ContainsFunc(c.uploadUUID, func(r rune) bool { return r <= ' ' || r >= 0x7f }):
		return fmt.Errorf("--upload-uuid %q: want a merger session id of at most %d printable characters", c.uploadUUID, upload.MaxUUIDLength)
	}
	return nil
}

// newMergerClient makes the merger's HTTP client from -C and its token
// and CA files.
func (c *cowFlags) newMergerClient() error {
	mc := upload.MergerConfig{CAFile: c.caFile}
	if c.tokenFile != "" {
		tok, err := upload.ReadTokenFile(c.tokenFile)
		if err != nil {
			return err
		}
		mc.Token = tok
	}
	m, err := upload.NewMergerClient(c.merger, mc)
	if err != nil {
		return fmt.Errorf("-C: %w", err)
	}
	c.client = m
	return nil
}

// sessionRID returns the revision recorded in a session to load (0 if the
// session has no record).
func (c *cowFlags) sessionRID() (uint16, error) {
	if c.loadDir == "" {
		return 0, nil
	}
	rid, err := cowstore.SessionRevision(c.loadDir)
	if err != nil && !errors.Is(err, cowstore.ErrNoRevision) {
		return 0, err
	}
	return rid, nil
}

// cowSession is an open overlay and its uploader.
type cowSession struct {
	flags    *cowFlags
	overlay  *cowstore.Overlay
	uploader *upload.Uploader // nil without -C
	stopRun  context.CancelFunc
	runDone  chan struct{}
	log      *slog.Logger
	merge    syncString // merge state for the metrics (metrics.go)
}

// openCOW creates or loads the session over img and starts the uploader.
func openCOW(ctx context.Context, c *cowFlags, img *client.Image, log *slog.Logger) (*cowSession, error) {
	opts := cowstore.Options{Remote: img, ImageName: img.Name(), RID: img.RID(), Logger: log}
	var ovl *cowstore.Overlay
	var err error
	if c.newDir != "" {
		ovl, err = cowstore.Create(c.newDir, opts)
	} else {
		ovl, err = cowstore.Load(c.loadDir, opts)
	}
	if err != nil {
		return nil, err
	}
	s := &cowSession{flags: c, overlay: ovl, log: log}
	if c.client == nil {
		log.Warn("no merger (-C): changes stay in the session directory only", "dir", c.dir())
		return s, nil
	}
	if c.uploadUUID != "" {
		if err := ovl.SetUUID(c.uploadUUID); err != nil {
			ovl.Close()
			return nil, err
		}
	}
	delay := c.uploadDelay
	if delay == 0 {
		delay = -1 // the uploader's 0 means its default; --upload-delay 0 means at once
	}
	cfg := upload.Config{MinDelay: delay, Logger: log}
	if c.statsStdout {
		cfg.StatsOut = c.statsOut
	}
	if c.statsFile {
		cfg.StatusFile = filepath.Join(c.dir(), "status")
	}
	s.uploader = upload.New(ovl, c.client, cfg)
	uuid, err := s.uploader.EnsureSession(ctx)
	if err != nil {
		ovl.Close()
		return nil, fmt.Errorf("merger session: %w (the COW session in %s is kept: continue it with -L %s)", err, c.dir(), c.dir())
	}
	log.Info("uploading changes", "merger", c.client.URL(), "uuid", uuid, "delay", c.uploadDelay)
	runCtx, stop := context.WithCancel(context.Background())
	s.stopRun, s.runDone = stop, make(chan struct{})
	go func() { defer close(s.runDone); s.uploader.Run(runCtx) }()
	return s, nil
}

// backendID names the device's backend so a restarted daemon with -L finds
// its device again.
func (s *cowSession) backendID() string {
	abs, err := filepath.Abs(s.flags.dir())
	if err != nil {
		abs = s.flags.dir()
	}
	return "dnbd3go-cow:" + abs
}

// finish ends the session. After a real detach (nothing writes any more)
// the uploader's final flush runs and, with -m, the merge request; if the
// device stays attached for a successor, uploads just stop.
func (s *cowSession) finish(ctx context.Context, detached bool) error {
	var ferr error
	switch {
	case s.uploader == nil:
	case s.overlay.Failed() != nil:
		// its data may be gone: upload nothing more, merge nothing
		s.stopRun()
		<-s.runDone
		s.log.Error("no final upload and no merge: the COW session failed", "dir", s.flags.dir(), "err", s.overlay.Failed())
	case detached:
		s.merge.Store(mergeFinalUpload)
		res, err := s.uploader.Finish(ctx, s.flags.merge)
		s.merge.Store(mergeOutcome(s.flags.merge, res.MergeAccepted))
		s.log.Info("final upload", "uploaded", res.Uploaded, "dirty", res.Dirty,
			"merge", res.MergeRequested, "mergeAccepted", res.MergeAccepted, "uuid", res.UUID)
		ferr = err
	default:
		s.stopRun()
		<-s.runDone
	}
	if err := s.overlay.Close(); err != nil && ferr == nil {
		ferr = fmt.Errorf("close session: %w", err)
	}
	return ferr
}

// cowStatus is the copy-on-write part of attach's status.
type cowStatus struct {
	Dir             string       `json:"dir"`
	UUID            string       `json:"uuid"`
	Size            int64        `json:"size"`
	ValidRemoteSize int64        `json:"validRemoteSize"`
	DirtyClusters   int          `json:"dirtyClusters"`
	CleanClusters   int          `json:"cleanClusters"`
	Upload          upload.Stats `json:"upload"`
}

func (s *cowSession) status() *cowStatus {
	d, c := s.overlay.Counts()
	st := &cowStatus{Dir: s.flags.dir(), UUID: s.overlay.UUID(), Size: s.overlay.Size(),
		ValidRemoteSize: s.overlay.ValidRemoteSize(), DirtyClusters: d, CleanClusters: c}
	if s.uploader != nil {
		st.Upload = s.uploader.Stats()
	}
	return st
}
