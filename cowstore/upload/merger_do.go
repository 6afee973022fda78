package upload

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// maxReply is how much of a reply body is read; the rest is discarded.
const maxReply = 64 << 10

// errStalled and errTimeout are the causes a request is cancelled with.
var (
	errStalled = errors.New("upload: no progress")
	errTimeout = errors.New("upload: request timeout")
)

// reply is a merger response with its body read.
type reply struct {
	status int
	header http.Header
	body   []byte
}

// ok reports a 2xx status.
func (r reply) ok() bool { return r.status >= 200 && r.status < 300 }

// statusError turns a non-2xx reply into a *StatusError.
func (m *MergerClient) statusError(op string, r reply) *StatusError {
	e := &StatusError{Op: op, StatusCode: r.status, Body: printable(r.body, 200)}
	if d, ok := parseRetryAfter(r.header.Get("Retry-After"), m.now()); ok {
		e.RetryAfter = d
	}
	return e
}

// do sends one request. parts are concatenated into the body (nil for a
// GET); the body has an exact Content-Length and can be replayed by the
// transport. A transport failure, a stall or a timeout is an error; any
// HTTP status is a reply.
func (m *MergerClient) do(ctx context.Context, op, method, endpoint, contentType string, parts ...[]byte) (reply, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if m.timeout > 0 {
		var stop context.CancelFunc
		ctx, stop = context.WithTimeoutCause(ctx, m.timeout, errTimeout)
		defer stop()
	}
	wd := newWatchdog(m.stall, func() { cancel(errStalled) })
	defer wd.stop()

	var size int64
	for _, p := range parts {
		size += int64(len(p))
	}
	newBody := func() io.Reader {
		rs := make([]io.Reader, len(parts))
		for i, p := range parts {
			rs[i] = bytes.NewReader(p)
		}
		return &progressReader{r: io.MultiReader(rs...), w: wd}
	}
	var body io.Reader
	if method != http.MethodGet {
		body = http.NoBody
		if size > 0 {
			body = newBody()
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, endpoint, body)
	if err != nil {
		return reply{}, fmt.Errorf("merger %s: %w", op, err)
	}
	if size > 0 {
		req.ContentLength = size
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(newBody()), nil }
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", "*/*")
	req.Header.Set("User-Agent", m.userAgent)
	if m.token != "" {
		req.Header.Set("Authorization", "Bearer "+m.token)
	}

	resp, err := m.client.Do(req)
	if err != nil {
		return reply{}, m.transportError(ctx, op, err)
	}
	defer resp.Body.Close()
	wd.touch()
	data, err := io.ReadAll(io.LimitReader(&progressReader{r: resp.Body, w: wd}, maxReply))
	if err != nil {
		return reply{}, m.transportError(ctx, op, fmt.Errorf("read reply: %w", err))
	}
	// Drain a little more so that the connection can be reused.
	_, _ = io.CopyN(io.Discard, resp.Body, maxReply)
	return reply{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

// transportError explains a failed request, naming a stall or timeout.
func (m *MergerClient) transportError(ctx context.Context, op string, err error) error {
	switch context.Cause(ctx) {
	case errStalled:
		return fmt.Errorf("merger %s: no progress for %s, aborted (is the merger at %s overloaded or hanging?): %w", op, m.stall, m.base, err)
	case errTimeout:
		return fmt.Errorf("merger %s: took longer than %s, aborted: %w", op, m.timeout, err)
	}
	return fmt.Errorf("merger %s: %w (check that the merger runs at %s)", op, err, m.base)
}
