package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// Defaults of Config. A zero field in Config means "use the default".
const (
	DefaultKeepaliveInterval      = 10 * time.Second
	DefaultConnectTimeout         = 1500 * time.Millisecond
	DefaultOpenTimeout            = 5 * time.Second
	DefaultOpenStagger            = 200 * time.Millisecond
	DefaultMaxRequest             = 1 << 20
	DefaultMaxInflight            = 128
	DefaultStallTimeout           = time.Second
	DefaultProbeTimeout           = 1500 * time.Millisecond
	DefaultProbeStartupInterval   = 2 * time.Second
	DefaultProbeStartupRounds     = 6
	DefaultProbeIntervalStep      = 2 * time.Second
	DefaultProbeMaxInterval       = 45 * time.Second
	DefaultProbeAfterSwitch       = 10 * time.Second
	DefaultProbeServers           = 3
	DefaultSwitchThreshold        = 1800 * time.Microsecond
	DefaultFailoverConnectTimeout = time.Second
	DefaultFailoverRetryMin       = 100 * time.Millisecond
	DefaultFailoverRetryMax       = 2 * time.Second
	DefaultFailedServerDelay      = 250 * time.Millisecond
	DefaultTickInterval           = 100 * time.Millisecond
)

// MaxServers is the largest number of servers an Image knows (given and
// learned through GET_SERVERS together), as in the reference FUSE client.
const MaxServers = 16

// Config says which image to read from which servers and how to behave
// when servers are slow or fail. Only Servers and Image are required;
// every zero duration or count takes the documented default.
type Config struct {
	// Servers lists the servers to try. Each entry is "host",
	// "host:port", "[v6addr]:port" or a bare IPv6 address; an entry may
	// hold several of them separated by spaces (the reference client's -h
	// syntax). The default port is 5003. A host name is resolved and up
	// to 2 of its addresses are used. Servers on the same IP with
	// different ports are different servers.
	Servers []string
	// Image is the image name.
	Image string
	// RID is the revision; 0 asks for the latest. After the first
	// handshake the resolved revision is used for every connection.
	RID uint16
	// Sticky disables learning servers through GET_SERVERS.
	Sticky bool
	// SelectFlags is the flags byte of SELECT_IMAGE: 0 for clients,
	// protocol.FlagServer (| protocol.FlagBgRep) for proxies.
	SelectFlags uint8

	// Deadline bounds how long a read may stay unanswered before it fails
	// with ErrDeadline. 0 waits forever, like the reference clients.
	Deadline time.Duration
	// KeepaliveInterval is the KEEPALIVE period on the active connection
	// (default 10 s).
	KeepaliveInterval time.Duration
	// ConnectTimeout bounds one connection attempt (TCP connect and
	// SELECT_IMAGE) in Open (default 1.5 s).
	ConnectTimeout time.Duration
	// OpenTimeout bounds the whole of Open (default 5 s).
	OpenTimeout time.Duration
	// OpenStagger is the delay between the starts of the connection
	// attempts to the listed servers in Open (default 200 ms).
	OpenStagger time.Duration
	// MaxRequest is the largest GET_BLOCK sent; larger reads are split
	// (default 1 MiB).
	MaxRequest int
	// MaxInflight bounds the GET_BLOCK requests outstanding on the
	// connection; more wait in a local queue (default 128; the reference
	// server disconnects proxied clients with more than 250).
	MaxInflight int
	// StallTimeout is the lower bound of the stall threshold T =
	// max(5 × RTT, StallTimeout) (default 1 s). The connection counts as
	// stalled, and the client fails over, when its oldest outstanding
	// request is older than T and nothing arrived for T, or when that
	// request is older than 8 × T, or a KEEPALIVE stays unanswered
	// with nothing received for T.
	StallTimeout time.Duration

	// NoProbe disables background RTT probing (and so switching to
	// faster servers). Failover still works.
	NoProbe bool
	// ProbeTimeout bounds one RTT probe: connect, SELECT_IMAGE and a
	// 4 KiB read (default 1.5 s, at least 4 × the current RTT).
	ProbeTimeout time.Duration
	// ProbeStartupInterval is the probe period during the startup phase
	// (default 2 s). The first round starts a quarter of it after a
	// connection is established.
	ProbeStartupInterval time.Duration
	// ProbeStartupRounds is the number of rounds of the startup phase,
	// which probe every server (default 6).
	ProbeStartupRounds int
	// ProbeIntervalStep is added to the probe period after each round
	// of the normal phase (default 2 s).
	ProbeIntervalStep time.Duration
	// ProbeMaxInterval caps the probe period (default 45 s).
	ProbeMaxInterval time.Duration
	// ProbeAfterSwitch is the probe period right after an RTT switch
	// (default 10 s).
	ProbeAfterSwitch time.Duration
	// ProbeServers is the number of random other servers probed with the
	// current one in a normal-phase round (default 3).
	ProbeServers int
	// SwitchThreshold is the hysteresis of an RTT switch: switch when
	// 3/4 × current RTT > best RTT + threshold, where threshold =
	// SwitchThreshold − 10 µs × bestCount (default 1.8 ms).
	SwitchThreshold time.Duration

	// FailoverConnectTimeout bounds one connection attempt while failing
	// over (default 1 s).
	FailoverConnectTimeout time.Duration
	// FailoverRetryMin and FailoverRetryMax bound the exponential backoff
	// between failover rounds while no server answers (default 100 ms
	// and 2 s).
	FailoverRetryMin, FailoverRetryMax time.Duration
	// FailedServerDelay delays the attempt to a server that failed
	// recently when failing over, so healthy servers win (default 250 ms).
	FailedServerDelay time.Duration
	// TickInterval is the period of the housekeeping timer (deadlines,
	// stalls) while reads are outstanding (default 100 ms).
	TickInterval time.Duration

	// Logger receives the client's log messages (default: none).
	Logger *slog.Logger
	// Dial opens connections (default net.Dialer.DialContext). Tests use
	// it to inject faults.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// withDefaults returns a copy of c with every zero field set to its default.
func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.KeepaliveInterval, DefaultKeepaliveInterval)
	def(&c.ConnectTimeout, DefaultConnectTimeout)
	def(&c.OpenTimeout, DefaultOpenTimeout)
	if c.OpenStagger < 0 {
		c.OpenStagger = 0
	} else if c.OpenStagger == 0 {
		c.OpenStagger = DefaultOpenStagger
	}
	if c.MaxRequest <= 0 {
		c.MaxRequest = DefaultMaxRequest
	}
	if c.MaxInflight <= 0 {
		c.MaxInflight = DefaultMaxInflight
	}
	def(&c.StallTimeout, DefaultStallTimeout)
	def(&c.ProbeTimeout, DefaultProbeTimeout)
	def(&c.ProbeStartupInterval, DefaultProbeStartupInterval)
	if c.ProbeStartupRounds <= 0 {
		c.ProbeStartupRounds = DefaultProbeStartupRounds
	}
	def(&c.ProbeIntervalStep, DefaultProbeIntervalStep)
	def(&c.ProbeMaxInterval, DefaultProbeMaxInterval)
	def(&c.ProbeAfterSwitch, DefaultProbeAfterSwitch)
	if c.ProbeServers <= 0 {
		c.ProbeServers = DefaultProbeServers
	}
	def(&c.SwitchThreshold, DefaultSwitchThreshold)
	def(&c.FailoverConnectTimeout, DefaultFailoverConnectTimeout)
	def(&c.FailoverRetryMin, DefaultFailoverRetryMin)
	def(&c.FailoverRetryMax, DefaultFailoverRetryMax)
	if c.FailoverRetryMax < c.FailoverRetryMin {
		c.FailoverRetryMax = c.FailoverRetryMin
	}
	def(&c.FailedServerDelay, DefaultFailedServerDelay)
	def(&c.TickInterval, DefaultTickInterval)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Dial == nil {
		var d net.Dialer
		c.Dial = d.DialContext
	}
	return c
}

// validate checks the fields a caller must get right.
func (c *Config) validate() error {
	if len(c.Servers) == 0 {
		return errors.New("client: no servers given: pass at least one host[:port]")
	}
	if c.Image == "" {
		return errors.New("client: no image name given")
	}
	if !protocol.ValidImageName(c.Image) {
		return fmt.Errorf("client: invalid image name %q: it must not be empty, start with '/' or '.', end with '/' or contain \"/.\"", c.Image)
	}
	if c.MaxRequest > 1<<30 {
		return fmt.Errorf("client: MaxRequest %d too large (at most 1 GiB)", c.MaxRequest)
	}
	return nil
}
