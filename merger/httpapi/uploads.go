package httpapi

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/dnbd3go/dnbd3go/merger"
)

// Upload admission. An upload's body (up to 1.3 MB) is read into memory
// before the Service stores it, so the memory of uploads in progress is
// bounded by bounding the uploads themselves: each one admitted holds one
// of MaxUploads cluster buffers, which are reused, from before its body
// is read until the Service has stored it. An upload is admitted only
// for a session that accepts uploads (Service.CanUpload), and at most
// MaxUploadsPerClient at a time per client address, so that one client
// cannot take every buffer; beyond that it is refused at once. When
// every buffer is in use, an upload waits up to uploadWait for one
// (bursts of honest clients just queue; the body is not read meanwhile),
// then gets 503 with Retry-After. Once admitted, its body must arrive
// within UploadTimeout (a read deadline on the connection), so a stalled
// client gives its buffer back.

// Defaults of Options.
const (
	// DefaultMaxUploads is the default of Options.MaxUploads: 32
	// buffers of 1.3 MB, at most 42 MB.
	DefaultMaxUploads = 32
	// DefaultMaxUploadsPerClient is the default of
	// Options.MaxUploadsPerClient: the reference client sends up to 10
	// uploads at once in its final flush.
	DefaultMaxUploadsPerClient = 10
	// DefaultUploadTimeout is the default of Options.UploadTimeout: a
	// full cluster at 22 KB/s.
	DefaultUploadTimeout = time.Minute
)

const (
	// uploadWait is how long an upload waits for a free buffer.
	uploadWait = 10 * time.Second
	// uploadRetryAfter is the delay suggested to an upload that was
	// refused because too many were in progress.
	uploadRetryAfter = 5 * time.Second
)

// uploadLimiter admits uploads (see above). It is safe for concurrent
// use.
type uploadLimiter struct {
	perClient int
	wait      time.Duration
	// bufs holds one entry per upload slot: a cluster buffer, or nil
	// for a slot whose buffer is not allocated yet.
	bufs chan []byte

	mu      sync.Mutex
	clients map[string]int // uploads in progress by client address
}

func newUploadLimiter(max, perClient int, wait time.Duration) *uploadLimiter {
	l := &uploadLimiter{perClient: perClient, wait: wait, bufs: make(chan []byte, max), clients: make(map[string]int)}
	for range max {
		l.bufs <- nil
	}
	return l
}

// acquire admits an upload from the client address source. It returns a
// buffer of MaxUpdateBytes and the function that gives it back, or a
// *merger.BackPressureError.
func (l *uploadLimiter) acquire(ctx context.Context, source string) ([]byte, func(), error) {
	l.mu.Lock()
	if l.clients[source] >= l.perClient {
		l.mu.Unlock()
		return nil, nil, &merger.BackPressureError{RetryAfter: uploadRetryAfter,
			Reason: fmt.Sprintf("%d uploads from %s are in progress, the most one client may send at once", l.perClient, source)}
	}
	l.clients[source]++
	l.mu.Unlock()
	done := func() {
		l.mu.Lock()
		if l.clients[source]--; l.clients[source] <= 0 {
			delete(l.clients, source)
		}
		l.mu.Unlock()
	}
	buf, ok := l.take(ctx)
	if !ok {
		done()
		return nil, nil, &merger.BackPressureError{RetryAfter: uploadRetryAfter,
			Reason: fmt.Sprintf("all %d upload slots are busy", cap(l.bufs))}
	}
	if buf == nil {
		buf = make([]byte, MaxUpdateBytes)
	}
	release := sync.OnceFunc(func() {
		l.bufs <- buf
		done()
	})
	return buf, release, nil
}

// take takes a slot, waiting up to l.wait or until ctx ends (the client
// left). ok is false if it got none; buf is nil for a slot whose buffer
// is not allocated yet.
func (l *uploadLimiter) take(ctx context.Context) (buf []byte, ok bool) {
	select {
	case buf = <-l.bufs:
		return buf, true
	default:
	}
	t := time.NewTimer(l.wait)
	defer t.Stop()
	select {
	case buf = <-l.bufs:
		return buf, true
	case <-t.C:
	case <-ctx.Done():
	}
	return nil, false
}
