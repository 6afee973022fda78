package upload

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// DefaultStallTimeout is how long a merger request may make no progress
// (no body bytes sent or received) before it is aborted.
const DefaultStallTimeout = 60 * time.Second

// MaxUUIDLength is the longest session id the merger may return from
// create, and the longest one --upload-uuid may give: the reference client
// stores at most 36 characters (a GUID) in the session's meta file.
const MaxUUIDLength = 36

// MergerConfig configures a Merger. The zero value talks plain HTTP or
// HTTPS with the system's root certificates and no token.
type MergerConfig struct {
	// Token, if set, is sent as "Authorization: Bearer <Token>" with every
	// request. The caller reads it from a file (see ReadTokenFile) so that
	// it does not show up in the process list.
	Token string
	// Client is the HTTP client to use. If nil, the Merger builds one from
	// TLSConfig and CAFile. Setting Client together with either is an error.
	Client *http.Client
	// TLSConfig is the TLS configuration for https:// merger URLs (cloned;
	// nil means Go's defaults).
	TLSConfig *tls.Config
	// CAFile is a PEM file with the CA certificates that sign the merger's
	// certificate. They replace the system roots (like curl's --cacert).
	CAFile string
	// Timeout bounds each request as a whole; 0 means no overall limit
	// (StallTimeout and the caller's context still apply).
	Timeout time.Duration
	// StallTimeout aborts a request that makes no progress for this long;
	// 0 means DefaultStallTimeout, a negative value disables the check.
	StallTimeout time.Duration
	// UserAgent is sent as User-Agent; "" means "dnbd3go".
	UserAgent string
	// Now is the clock for HTTP-date Retry-After values; nil means
	// time.Now.
	Now func() time.Time
}

// MergerClient is a client for the merger service's v1 REST API. It is safe for
// concurrent use.
type MergerClient struct {
	base      string // scheme://host[:port][/prefix], no trailing slash
	token     string
	client    *http.Client
	ownClient bool
	timeout   time.Duration
	stall     time.Duration
	userAgent string
	now       func() time.Time
}

// NewMergerClient returns a client for the merger at target, the value of the
// reference client's -C flag: "host:port" (plain HTTP, as the reference's
// curl assumes) or an "http://" or "https://" URL, optionally with a path
// prefix in front of /v1/.
func NewMergerClient(target string, cfg MergerConfig) (*MergerClient, error) {
	base, err := parseMergerURL(target)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(cfg.Token, "\r\n") || strings.TrimSpace(cfg.Token) != cfg.Token {
		return nil, errors.New("upload: merger token contains whitespace or line breaks: give exactly one token")
	}
	m := &MergerClient{
		base:      base,
		token:     cfg.Token,
		client:    cfg.Client,
		timeout:   cfg.Timeout,
		stall:     cfg.StallTimeout,
		userAgent: cfg.UserAgent,
		now:       cfg.Now,
	}
	if m.stall == 0 {
		m.stall = DefaultStallTimeout
	}
	if m.userAgent == "" {
		m.userAgent = "dnbd3go"
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.client != nil {
		if cfg.TLSConfig != nil || cfg.CAFile != "" {
			return nil, errors.New("upload: merger client: set either Client or TLSConfig/CAFile, not both")
		}
		return m, nil
	}
	tlsCfg, err := mergerTLS(cfg.TLSConfig, cfg.CAFile)
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsCfg
	// Up to 10 uploads run at once in the final flush; keep their
	// connections instead of reconnecting for every cluster.
	tr.MaxIdleConnsPerHost = 16
	m.client = &http.Client{Transport: tr}
	m.ownClient = true
	return m, nil
}

// parseMergerURL turns a -C value into a base URL without trailing slash.
func parseMergerURL(target string) (string, error) {
	t := strings.TrimSpace(target)
	if t == "" {
		return "", errors.New("upload: merger address is empty: give host:port or an http(s):// URL")
	}
	if !strings.Contains(t, "://") {
		t = "http://" + t
	}
	u, err := url.Parse(t)
	if err != nil {
		return "", fmt.Errorf("merger address %q: %w (give host:port or an http(s):// URL)", target, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("upload: merger address %q: scheme %q is not supported: use http:// or https://", target, u.Scheme)
	case u.Host == "" || u.Hostname() == "":
		return "", fmt.Errorf("upload: merger address %q has no host: give host:port or an http(s):// URL", target)
	case u.User != nil:
		return "", fmt.Errorf("upload: merger address %q contains credentials: use a token file instead", target)
	case u.RawQuery != "" || u.Fragment != "" || u.ForceQuery:
		return "", fmt.Errorf("upload: merger address %q must not have a query or fragment", target)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u.String(), nil
}

// mergerTLS builds the TLS configuration from a base config and a CA file.
func mergerTLS(base *tls.Config, caFile string) (*tls.Config, error) {
	var c *tls.Config
	if base != nil {
		c = base.Clone()
	} else {
		c = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if caFile == "" {
		return c, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("merger CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("upload: merger CA file %s holds no PEM certificate", caFile)
	}
	c.RootCAs = pool
	return c, nil
}

// ReadTokenFile reads a bearer token from a file: its content with
// surrounding whitespace removed, which must be one non-empty line.
func ReadTokenFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("merger token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	switch {
	case tok == "":
		return "", fmt.Errorf("upload: merger token file %s is empty", path)
	case strings.ContainsAny(tok, "\r\n"):
		return "", fmt.Errorf("upload: merger token file %s has more than one line: put only the token in it", path)
	}
	for _, r := range tok {
		if r < 0x21 || r > 0x7e {
			return "", fmt.Errorf("upload: merger token file %s contains spaces or non-ASCII characters", path)
		}
	}
	return tok, nil
}

// URL returns the merger's base URL (scheme, host and path prefix).
func (m *MergerClient) URL() string { return m.base }

// CloseIdleConnections closes the kept-alive connections of a client the
// Merger built itself (not of one passed in MergerConfig.Client).
func (m *MergerClient) CloseIdleConnections() {
	if m.ownClient {
		m.client.CloseIdleConnections()
	}
}

// checkUUID validates a session id before it goes into a request.
func checkUUID(uuid string) error {
	if uuid == "" {
		return errors.New("upload: no merger session id: create a session first or pass --upload-uuid")
	}
	if len(uuid) > MaxUUIDLength {
		return fmt.Errorf("upload: merger session id %q is longer than %d characters", uuid, MaxUUIDLength)
	}
	for i := 0; i < len(uuid); i++ {
		if c := uuid[i]; c <= 0x20 || c >= 0x7f {
			return fmt.Errorf("upload: merger session id %q contains spaces or control characters", uuid)
		}
	}
	return nil
}
