package nbdbridge

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

const (
	// handshakeTimeout bounds the option haggling of a socket client.
	handshakeTimeout = 30 * time.Second
	// acceptBackoffMax caps the pause after a failing Accept (EMFILE...).
	acceptBackoffMax = time.Second
)

// ServeListener accepts NBD clients (QEMU, nbdinfo, nbdcopy, nbd-client)
// on ln, runs the fixed newstyle handshake with each and then serves the
// export with ServeConn semantics, all connections sharing the engine's
// worker pool and FLUSH ordering. The export answers to exportName and to
// the empty default name ""; description is announced in
// NBD_INFO_DESCRIPTION when not empty.
//
// ServeListener closes ln and returns once ctx is cancelled or the engine
// closed and every connection it accepted has ended: nil after ctx was
// cancelled, ErrEngineClosed after Close, or the error of Accept.
func (e *Engine) ServeListener(ctx context.Context, ln net.Listener, exportName, description string) error {
	if !e.enter() {
		ln.Close()
		return ErrEngineClosed
	}
	defer e.leave()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopEngine := context.AfterFunc(e.ctx, cancel)
	defer stopEngine()
	stopListener := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopListener()

	var wg sync.WaitGroup
	defer wg.Wait()
	backoff := 5 * time.Millisecond
	for {
		conn, err := ln.Accept()
		if err != nil {
			switch {
			case e.ctx.Err() != nil:
				return ErrEngineClosed
			case ctx.Err() != nil:
				return nil
			case isTemporaryAcceptError(err):
				e.log.Warn("nbd: accept failed, retrying", "err", err, "backoff", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
				}
				backoff = min(2*backoff, acceptBackoffMax)
				continue
			}
			cancel()
			ln.Close()
			return fmt.Errorf("accepting NBD clients: %w", err)
		}
		backoff = 5 * time.Millisecond
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := e.ServeNBD(ctx, conn, exportName, description)
			switch {
			case err == nil, errors.Is(err, ErrDisconnected), errors.Is(err, errHandshakeAborted),
				errors.Is(err, context.Canceled), errors.Is(err, ErrEngineClosed), errors.Is(err, io.EOF):
				e.log.Debug("nbd: client done", "remote", remoteName(conn), "err", err)
			default:
				e.log.Info("nbd: client connection ended", "remote", remoteName(conn), "err", err)
			}
		}()
	}
}

// ServeNBD serves one accepted NBD client connection: the fixed newstyle
// handshake (at most 30 s), then the transmission phase as ServeConn. The
// export answers to exportName and to "". It closes conn before
// returning and returns what ServeConn returns, or the handshake's error.
func (e *Engine) ServeNBD(ctx context.Context, conn net.Conn, exportName, description string) error {
	if !e.enter() {
		conn.Close()
		return ErrEngineClosed
	}
	defer e.leave()
	x := &exportConfig{
		name:        exportName,
		description: description,
		size:        e.Size,
		flags:       e.Flags(),
		minBlock:    e.minBlock,
		prefBlock:   e.prefBlock,
		maxBlock:    uint32(min(e.maxRequest, maxInfoBlockSize)),
	}
	br := bufio.NewReaderSize(conn, readBufferSize)
	conn.SetDeadline(time.Now().Add(e.handshakeTimeout))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	stopEngine := context.AfterFunc(e.ctx, func() { conn.SetDeadline(time.Now()) })
	err := negotiate(br, conn, x)
	stop()
	stopEngine()
	if err != nil {
		conn.Close()
		if e.ctx.Err() != nil {
			return ErrEngineClosed
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("handshake: %w", err)
	}
	conn.SetDeadline(time.Time{})
	return e.serveTransmission(ctx, conn, br)
}

// isTemporaryAcceptError reports errors after which Accept can succeed
// again (out of file descriptors, aborted connections).
func isTemporaryAcceptError(err error) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var se interface{ Temporary() bool }
	return errors.As(err, &se) && se.Temporary()
}
