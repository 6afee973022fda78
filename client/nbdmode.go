package client

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/dnbd3go/dnbd3go/protocol"
)

// The client side of the kernel-direct data path (docs/kernel-direct.md):
// connections to a server that offers protocol.FeatureNBD, switched to the
// NBD transmission protocol, for dnbd3-nbd attach to hand to the kernel's
// nbd driver. The Image keeps choosing the server (RTT probing, failover,
// learning servers); DialNBD follows its choice.

// ErrNoNBD means no reachable server offers the switch to NBD (reference
// servers and older dnbd3go servers do not): use the relay path.
var ErrNoNBD = errors.New("client: no server offers the switch to the NBD protocol")

// DialNBD opens n connections to one server for the Image's image (same
// name, revision and size), each switched to the NBD transmission
// protocol, and returns them with the server's address. The Image's
// current server is tried first; if it cannot, every other known server is
// tried at once and the first that switches wins. The connections carry
// no deadlines and nothing is buffered from them: the next byte read is
// the first NBD reply.
func (i *Image) DialNBD(ctx context.Context, n int) ([]net.Conn, string, error) {
	if n <= 0 {
		return nil, "", fmt.Errorf("client: DialNBD of %d connections", n)
	}
	first, rest := i.nbdCandidates()
	if first == nil && len(rest) == 0 {
		return nil, "", ErrClosed
	}
	timeout := i.cfg.FailoverConnectTimeout
	var errs []string
	unsupported := 0
	note := func(s *server, err error) {
		errs = append(errs, s.key+": "+err.Error())
		if errors.Is(err, ErrNoNBD) {
			unsupported++
		}
	}
	var srv *server
	var c0 net.Conn
	if first != nil {
		c, err := dialNBD(ctx, i.cfg.Dial, first, i.id, timeout)
		if err == nil {
			srv, c0 = first, c
		} else {
			note(first, err)
		}
	}
	if c0 == nil && len(rest) > 0 {
		win, failed := raceHandshakes(ctx, i.cfg.Dial, rest, nil, i.id, protocol.FlagFeatures, timeout,
			func(ctx context.Context, d *dialed) error { return toNBD(ctx, d, timeout) })
		for _, f := range failed {
			note(f.srv, f.err)
		}
		if win != nil {
			srv, c0 = win.srv, win.nc
		}
	}
	if c0 == nil {
		if unsupported > 0 && unsupported == len(errs) {
			return nil, "", ErrNoNBD
		}
		return nil, "", fmt.Errorf("%w (%s)", ErrNoNBD, strings.Join(errs, "; "))
	}
	conns := []net.Conn{c0}
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, n-1)
	for range n - 1 {
		go func() {
			c, err := dialNBD(ctx, i.cfg.Dial, srv, i.id, timeout)
			ch <- res{c, err}
		}()
	}
	var firstErr error
	for range n - 1 {
		r := <-ch
		if r.err != nil {
			firstErr = cmp.Or(firstErr, r.err)
			continue
		}
		conns = append(conns, r.c)
	}
	if firstErr != nil {
		for _, c := range conns {
			c.Close()
		}
		return nil, "", fmt.Errorf("NBD connections to %s: %w", srv.key, firstErr)
	}
	return conns, srv.key, nil
}

// nbdCandidates returns the current server and the others, fastest
// (lowest RTT estimate) first, servers that failed recently last.
func (i *Image) nbdCandidates() (*server, []*server) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.closed {
		return nil, nil
	}
	var cur *server
	if i.active != nil {
		cur = i.active.srv
	}
	var rest []*server
	for _, s := range i.servers {
		if s != cur {
			rest = append(rest, s)
		}
	}
	slices.SortStableFunc(rest, func(a, b *server) int {
		if c := cmp.Compare(min(a.consec, 1), min(b.consec, 1)); c != 0 {
			return c
		}
		ra, rb := a.rttEstimate(), b.rttEstimate()
		if ra == 0 || rb == 0 {
			return cmp.Compare(rb, ra) // unknown last
		}
		return cmp.Compare(ra, rb)
	})
	return cur, rest
}

// dialNBD connects to srv, selects the image with FlagFeatures and
// switches the connection to NBD.
func dialNBD(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), srv *server, want identity, timeout time.Duration) (net.Conn, error) {
	d, err := handshake(ctx, dial, srv, want, protocol.FlagFeatures, timeout)
	if err != nil {
		return nil, err
	}
	if err := toNBD(ctx, d, timeout); err != nil {
		return nil, err
	}
	return d.nc, nil
}

// toNBD switches a connection that selected the image with FlagFeatures
// to NBD, within timeout; it closes d if it cannot.
func toNBD(ctx context.Context, d *dialed, timeout time.Duration) error {
	if d.reply.Features&protocol.FeatureNBD == 0 {
		d.close()
		return ErrNoNBD
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stop := watchConn(ctx, d.nc)
	err := switchNBD(d)
	if !stop() || err != nil {
		d.close()
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("switch to NBD: %w", context.Cause(ctx))
		}
		return err
	}
	return nil
}

// switchNBD sends CmdNBDMode and reads its answer; afterwards nothing of
// the connection may be left in d.br.
func switchNBD(d *dialed) error {
	hdr := protocol.Request{Cmd: protocol.CmdNBDMode, Handle: 1}.Marshal()
	if _, err := d.nc.Write(hdr[:]); err != nil {
		return fmt.Errorf("send NBD_MODE: %w", err)
	}
	var rb [protocol.ReplySize]byte
	if _, err := io.ReadFull(d.br, rb[:]); err != nil {
		return fmt.Errorf("read NBD_MODE reply: %w", err)
	}
	rep, err := protocol.ParseReply(rb[:])
	switch {
	case err != nil:
		return fmt.Errorf("%w: NBD_MODE reply: %w", ErrProtocol, err)
	case rep.Cmd == protocol.CmdError && rep.Size == 0:
		return fmt.Errorf("server refused the switch to NBD: %w", ErrNoNBD)
	case rep.Cmd != protocol.CmdNBDMode || rep.Size != 0 || rep.Handle != 1:
		return fmt.Errorf("%w: NBD_MODE reply %v", ErrProtocol, rep)
	case d.br.Buffered() > 0:
		return fmt.Errorf("%w: %d bytes after the NBD_MODE reply", ErrProtocol, d.br.Buffered())
	}
	d.nc.SetDeadline(time.Time{})
	return nil
}
