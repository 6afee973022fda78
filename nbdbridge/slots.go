package nbdbridge

// The device's connections to the kernel ("slots"). Each is either a
// relay slot (a socketpair whose other end the engine serves from the
// Backend) or a direct slot (a TCP connection to a DNBD3 server in NBD
// mode, docs/kernel-direct.md). One control goroutine owns them: it
// replaces slots that die with netlink RECONFIGURE, prefers direct slots
// when a DirectDialer is set, falls back to relay slots when no server
// offers the NBD switch, moves direct slots to the server the client
// prefers, and tells a failure from a disconnect.

import (
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Timing of the control loop.
const (
	ctlTick = time.Second
	// hangupGrace is how long hang-ups of direct slots wait for a
	// LINK_DEAD before they count as a disconnect (the kernel announces
	// every failure with LINK_DEAD, never a DISCONNECT).
	hangupGrace = 500 * time.Millisecond
	// directRetry is how long after a failed direct dial the device stays
	// on relay slots before it tries again.
	directRetry = 30 * time.Second
	// migrateAfter is how long direct slots may point at a server other
	// than the preferred one before they are moved even while busy
	// (normally they move when the device is idle).
	migrateAfter = 30 * time.Second
	// maxDirectTimeout caps the kernel request timeout of direct slots
	// when a slow server makes it grow.
	maxDirectTimeout = 32 * time.Second
	// timeoutDecay is how long without a slow server the grown timeout
	// waits before it halves again.
	timeoutDecay = 5 * time.Minute
)

// slot is one kernel connection the device tracks.
type slot struct {
	direct bool
	fd     int      // direct: our descriptor of the TCP socket
	conn   net.Conn // relay: our end of the socketpair
	server string   // direct: the server it is connected to
	since  time.Time
}

// ctlEvent is sent to the control loop.
type ctlEvent struct {
	down     *slot // a relay slot stopped serving (not by DISC)
	disc     *slot // a relay slot ended with the kernel's DISC
	linkDead bool  // LINK_DEAD for this device
	follow   bool  // move direct slots to the preferred server now (FollowPreferred)
}

// SlotStatus describes the device's connections (for status output).
type SlotStatus struct {
	Mode         string `json:"mode"` // direct, relay, mixed, or untracked (taken over, still working)
	Direct       int    `json:"direct"`
	Relay        int    `json:"relay"`
	Untracked    int    `json:"untracked"`
	DirectServer string `json:"directServer,omitempty"`
	// DirectOn counts the direct slots per server (more than one server
	// while slots move to another).
	DirectOn      map[string]int `json:"directOn,omitempty"`
	DirectTimeout time.Duration  `json:"directTimeout,omitempty"`
	Replaced      uint64         `json:"replaced"`
}

// SlotStatus returns the state of the device's connections.
func (d *Device) SlotStatus() SlotStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := SlotStatus{Untracked: d.untracked, Replaced: d.replaced}
	for _, s := range d.slots {
		if s.direct {
			st.Direct++
			st.DirectServer = s.server
			if st.DirectOn == nil {
				st.DirectOn = map[string]int{}
			}
			st.DirectOn[s.server]++
		} else {
			st.Relay++
		}
	}
	switch {
	case st.Direct > 0 && st.Relay > 0:
		st.Mode = "mixed"
	case st.Direct > 0:
		st.Mode = "direct"
	case st.Relay > 0:
		st.Mode = "relay"
	default:
		st.Mode = "untracked"
	}
	if st.Direct > 0 {
		st.DirectTimeout = d.directTimeout
	}
	return st
}

// offer creates k new slots (direct ones if possible, else relay ones)
// and hands them to the kernel: with CONNECT when connect is set (the
// returned index), else with RECONFIGURE into dead slots. It returns how
// many the kernel adopted; the rest are closed.
func (d *Device) offer(k int, connect bool, size int64) (adoptedN, index int, err error) {
	fresh, kfds, err := d.newSlots(k)
	if err != nil {
		return 0, -1, err
	}
	for _, fd := range kfds {
		markOffered(fd)
	}
	timeout := d.timeoutFor(fresh)
	if connect {
		index, err = Connect(ConnectOptions{
			Index:           d.opts.Device,
			SizeBytes:       uint64(size),
			BlockSize:       d.opts.BlockSize,
			ServerFlags:     uint64(d.engine.Flags()),
			Timeout:         timeout,
			DeadConnTimeout: d.opts.DeadConnTimeout,
			BackendID:       d.opts.BackendID,
			SocketFDs:       kfds,
		})
	} else {
		err = Reconfigure(d.Index, ReconfigureOptions{BackendID: d.opts.BackendID, SocketFDs: kfds,
			Timeout: timeout, DeadConnTimeout: d.opts.DeadConnTimeout})
	}
	if err != nil {
		d.closeFresh(fresh, kfds)
		return 0, -1, err
	}
	if connect {
		d.pushIOTimeout(index, timeout)
	} else {
		d.pushIOTimeout(d.Index, timeout)
	}
	d.curTimeout = timeout
	return d.keepAdopted(fresh, kfds), index, nil
}

// newSlots makes k slots: kernel-direct sockets to a server when the
// direct path is wanted and available, socket pairs to this daemon for the
// rest. kfds are the kernel's descriptors, parallel to the slots.
func (d *Device) newSlots(k int) (fresh []*slot, kfds []int, err error) {
	if d.wantDirect() {
		conns, server, derr := d.opts.Direct.DialDirect(d.ctx, k)
		if derr != nil {
			d.directRetryAt = time.Now().Add(directRetry)
			d.log.Info("kernel-direct path not available, the daemon relays", "device", d.Path, "err", derr)
		}
		for _, c := range conns {
			fd, kerr := kernelSocket(c)
			if kerr != nil {
				d.log.Warn("kernel-direct socket", "err", kerr)
				continue
			}
			fresh = append(fresh, &slot{direct: true, fd: fd, server: server})
			kfds = append(kfds, fd)
		}
	}
	for len(fresh) < k {
		conn, kfd, serr := socketPair()
		if serr != nil {
			d.closeFresh(fresh, kfds)
			return nil, nil, serr
		}
		fresh = append(fresh, &slot{conn: conn})
		kfds = append(kfds, kfd)
	}
	return fresh, kfds, nil
}

// closeFresh closes slots the kernel did not take.
func (d *Device) closeFresh(fresh []*slot, kfds []int) {
	for i, s := range fresh {
		d.closeSlot(s)
		if !s.direct {
			unix.Close(kfds[i])
		}
	}
}

// keepAdopted keeps the slots the kernel took (and serves the relayed
// ones), closes the others and returns how many it kept.
func (d *Device) keepAdopted(fresh []*slot, kfds []int) (adoptedN int) {
	now := time.Now()
	for i, s := range fresh {
		ok := adopted(kfds[i])
		if !s.direct {
			unix.Close(kfds[i]) // the kernel holds its own reference
		}
		if !ok {
			d.closeSlot(s)
			continue
		}
		adoptedN++
		s.since = now
		d.mu.Lock()
		d.slots = append(d.slots, s)
		d.mu.Unlock()
		if !s.direct {
			d.wg.Add(1)
			go d.serveRelay(s)
		}
	}
	return adoptedN
}

// wantDirect reports whether new slots should try the direct path.
func (d *Device) wantDirect() bool {
	return d.opts.Direct != nil && !time.Now().Before(d.directRetryAt)
}

// timeoutFor is the kernel request timeout once slots are in use: the
// relay timeout while any relay slot serves (the daemon's own deadline
// must fire first), else the direct one (how long a request on a dead
// server's socket waits before the kernel re-sends it).
func (d *Device) timeoutFor(fresh []*slot) time.Duration {
	for _, s := range fresh {
		if !s.direct {
			return d.opts.Timeout
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.slots {
		if !s.direct {
			return d.opts.Timeout
		}
	}
	return d.directTimeout
}

// closeSlot releases our side of a slot.
func (d *Device) closeSlot(s *slot) {
	if s.direct {
		unix.Close(s.fd)
	} else {
		s.conn.Close()
	}
}

// dropSlot forgets a slot and closes it.
func (d *Device) dropSlot(s *slot) {
	d.mu.Lock()
	for i, x := range d.slots {
		if x == s {
			d.slots = append(d.slots[:i], d.slots[i+1:]...)
			break
		}
	}
	d.mu.Unlock()
	d.closeSlot(s)
}

// serveRelay serves a relay slot until it ends and reports how.
func (d *Device) serveRelay(s *slot) {
	defer d.wg.Done()
	d.track(s.conn, true)
	err := d.engine.ServeConn(d.ctx, s.conn)
	d.track(s.conn, false)
	if d.ctx.Err() != nil {
		return
	}
	ev := ctlEvent{down: s}
	if err == nil || errors.Is(err, ErrDisconnected) {
		ev = ctlEvent{disc: s}
	} else {
		d.log.Warn("kernel connection lost", "device", d.Path, "err", err)
	}
	select {
	case d.events <- ev:
	case <-d.ctx.Done():
	}
}

// control is the slot manager (one goroutine per device).
func (d *Device) control() {
	defer d.wg.Done()
	tick := time.NewTicker(ctlTick)
	defer tick.Stop()
	c := ctlState{lastSlow: time.Now()}
	for {
		var wake <-chan time.Time
		var timer *time.Timer
		if c.wait > 0 {
			timer = time.NewTimer(c.wait)
			wake = timer.C
		}
		select {
		case <-d.ctx.Done():
			return
		case ev := <-d.events:
			switch {
			case ev.linkDead:
				c.linkDeads++
			case ev.follow:
				c.forceMove = true
			case ev.disc != nil:
				c.disc = true
				d.dropSlot(ev.disc)
			case ev.down != nil:
				d.dropSlot(ev.down)
				c.lost++
			}
		case <-tick.C:
		case <-wake:
		}
		if timer != nil {
			timer.Stop()
		}
		if d.step(&c) {
			d.disconnected()
			return
		}
	}
}

// ctlState is the control loop's memory between steps.
type ctlState struct {
	linkDeads     int       // LINK_DEAD events not yet accounted for
	lost          int       // slots lost since the last replacement
	lostServer    string    // the server of lost direct slots
	hangupAt      time.Time // direct hang-ups without a LINK_DEAD yet
	disc          bool      // a relay slot ended with DISC
	wait          time.Duration
	failures      int // replacement rounds in a row that failed
	retryAt       time.Time
	lastSlow      time.Time // last time a live server's slot died (timeout)
	migrateSince  time.Time // direct slots point away from the preferred server since
	forceMove     bool      // FollowPreferred: move misplaced slots even while busy
	upgradeTrieAt time.Time

	// read latency of the device (sysfs stat), for the direct timeout
	statAt            time.Time
	statReads, statMs int64
	latency           time.Duration // moving average
	latencyTimeout    time.Duration // latencyFactor × latency, in steps of 100 ms
}

// latencyFactor: the direct request timeout stays at least this many
// times the device's average read latency, so that a loaded server does
// not look dead (a request timeout kills its socket and delays every
// other request in flight on it by a timeout).
const latencyFactor = 10

// step does what is due; it reports true once the device is disconnected.
func (d *Device) step(c *ctlState) bool {
	c.wait = 0
	now := time.Now()
	if wait := d.dropHungUp(c, now); wait {
		return false
	}
	if c.disc || d.detaching.Load() {
		return d.allEnded()
	}
	if !connectedOrUnknown(d.Index) {
		return true
	}
	d.mu.Lock()
	missing := d.opts.Connections - len(d.slots) - d.untracked
	untracked := d.untracked
	d.mu.Unlock()
	// A LINK_DEAD no tracked slot explains: an untracked slot (taken over
	// from a previous daemon) died.
	probeUntracked := c.linkDeads > 0 && c.lost == 0 && untracked > 0
	if (missing > 0 || probeUntracked) && !now.Before(c.retryAt) {
		k := missing
		if probeUntracked {
			k += untracked
		}
		d.replaceSlots(c, now, k, missing)
		c.linkDeads, c.lost = 0, 0
	}
	if c.linkDeads > 0 && c.lost == 0 && untracked == 0 && missing <= 0 {
		c.linkDeads = 0 // a retired or already replaced slot
	}
	d.followLatency(c, now)
	d.decayTimeout(c, now)
	d.migrate(c, now)
	return false
}

// dropHungUp drops the direct slots whose server hung up. It returns true
// when every slot hung up only just now and the loop should wait a little
// for the kernel's LINK_DEAD (c.wait is set): a failure is always
// announced with LINK_DEAD, a DISCONNECT (dnbd3-nbd detach, nbd-client -d)
// is not.
func (d *Device) dropHungUp(c *ctlState, now time.Time) bool {
	d.mu.Lock()
	var dead []*slot
	for _, s := range d.slots {
		if s.direct && hungUp(s.fd) {
			dead = append(dead, s)
		}
	}
	all := len(dead) == len(d.slots) && d.untracked == 0
	d.mu.Unlock()
	if len(dead) == 0 {
		return false
	}
	if c.hangupAt.IsZero() {
		c.hangupAt = now
	}
	if c.linkDeads == 0 && !d.detaching.Load() && all && now.Sub(c.hangupAt) < hangupGrace {
		c.wait = hangupGrace - now.Sub(c.hangupAt)
		return true
	}
	if all && c.linkDeads == 0 || d.detaching.Load() {
		c.disc = true
	}
	for _, s := range dead {
		c.lostServer = s.server
		d.dropSlot(s)
		c.lost++
	}
	c.hangupAt = time.Time{}
	return false
}

// replaceSlots offers the kernel k new connections for the missing ones.
func (d *Device) replaceSlots(c *ctlState, now time.Time, k, missing int) {
	// The kernel only takes a socket into a slot it has marked dead: give
	// it a moment after the first news.
	time.Sleep(50 * time.Millisecond)
	got, _, err := d.offer(k, false, 0)
	if err != nil {
		c.failures++
		c.retryAt = now.Add(min(time.Duration(c.failures)*time.Second, 10*time.Second))
		d.log.Error("cannot give the kernel new connections", "device", d.Path, "err", err)
		return
	}
	c.failures = 0
	d.mu.Lock()
	d.replaced += uint64(got)
	if extra := got - missing; extra > 0 {
		d.untracked = max(d.untracked-extra, 0)
	}
	d.mu.Unlock()
	d.noteSlowServer(c, now)
	if got < missing {
		// Not dead yet in the kernel's view: try again shortly.
		c.wait = 200 * time.Millisecond
	}
	d.log.Info("replaced kernel connections", "device", d.Path, "adopted", got, "offered", k, "mode", d.SlotStatus().Mode)
}

// followLatency keeps the direct timeout at latencyFactor times the
// average read latency of the last seconds (from /sys/block/nbdX/stat).
func (d *Device) followLatency(c *ctlState, now time.Time) {
	if now.Sub(c.statAt) < ctlTick {
		return
	}
	reads, ms, err := d.sysfs.readStat(d.Index)
	if err != nil {
		return
	}
	if !c.statAt.IsZero() && reads > c.statReads {
		avg := time.Duration(ms-c.statMs) * time.Millisecond / time.Duration(reads-c.statReads)
		c.latency = (3*c.latency + avg) / 4
	}
	c.statAt, c.statReads, c.statMs = now, reads, ms
	const step = 100 * time.Millisecond
	want := ((latencyFactor*c.latency + step - 1) / step) * step
	c.latencyTimeout = want
	d.mu.Lock()
	raise := want > d.directTimeout && d.directTimeout < maxDirectTimeout
	if raise {
		d.directTimeout = min(want, maxDirectTimeout)
	}
	t := d.directTimeout
	d.mu.Unlock()
	if raise {
		c.lastSlow = now
		d.log.Info("the server answers slowly: raising the direct request timeout", "device", d.Path,
			"latency", c.latency.Round(time.Millisecond), "timeout", t)
		d.applyTimeout()
	}
}

// noteSlowServer grows the direct request timeout when direct slots died
// but their server still answers (the replacement went to the same
// server): a request took longer than the timeout.
func (d *Device) noteSlowServer(c *ctlState, now time.Time) {
	if c.lostServer == "" {
		return
	}
	st := d.SlotStatus()
	d.mu.Lock()
	grow := st.DirectServer == c.lostServer && d.directTimeout < maxDirectTimeout
	if grow {
		d.directTimeout = min(2*d.directTimeout, maxDirectTimeout)
	}
	t := d.directTimeout
	d.mu.Unlock()
	if grow {
		c.lastSlow = now
		d.log.Warn("direct connections to a live server died (a request outlasted the timeout): raising the timeout",
			"device", d.Path, "server", c.lostServer, "timeout", t)
		d.applyTimeout()
	}
	c.lostServer = ""
}

// decayTimeout halves a grown direct timeout after timeoutDecay without
// a slow server.
func (d *Device) decayTimeout(c *ctlState, now time.Time) {
	d.mu.Lock()
	floor := max(d.opts.DirectTimeout, c.latencyTimeout)
	decay := d.directTimeout > floor && now.Sub(c.lastSlow) >= timeoutDecay
	if decay {
		d.directTimeout = max(d.directTimeout/2, floor)
	}
	d.mu.Unlock()
	if decay {
		c.lastSlow = now
		d.applyTimeout()
	}
}

// applyTimeout sends the current request timeout to the kernel if it
// changed (it applies to requests started afterwards).
func (d *Device) applyTimeout() {
	t := d.timeoutFor(nil)
	if t == d.curTimeout {
		return
	}
	if err := Reconfigure(d.Index, ReconfigureOptions{BackendID: d.opts.BackendID, Timeout: t}); err != nil {
		d.log.Warn("cannot change the request timeout", "device", d.Path, "err", err)
		return
	}
	d.pushIOTimeout(d.Index, t)
	d.curTimeout = t
}

// pushIOTimeout gives the block layer a request timeout finer than the
// whole seconds of netlink's TIMEOUT (which the kernel just applied,
// rounded up): /sys/block/nbdX/queue/io_timeout, in milliseconds, is the
// timer of every request started afterwards. The driver still sees a
// non-zero TIMEOUT, so an expired request is re-sent, not failed.
func (d *Device) pushIOTimeout(index int, t time.Duration) {
	if t%time.Second == 0 {
		return // the kernel's own value is exact
	}
	if err := d.sysfs.setQueueInt(index, "io_timeout", int(t/time.Millisecond)); err != nil {
		d.log.Warn("cannot set the request timeout below a second", "device", DevicePath(index), "err", err)
	}
}

// migrate moves direct slots to the preferred server and relay slots to
// the direct path, one slot per step: it retires a slot (shutdown), the
// kernel marks it dead and the next step replaces it. Only while the
// device is idle, so no request waits for the timeout of a retired
// socket; direct slots on a server that is not preferred any more move
// after migrateAfter anyway.
func (d *Device) migrate(c *ctlState, now time.Time) {
	if d.opts.Direct == nil {
		return
	}
	pref := d.opts.Direct.Preferred()
	d.mu.Lock()
	var victim *slot
	misplaced := false
	for _, s := range d.slots {
		if s.direct && pref != "" && s.server != pref {
			misplaced = true
			if victim == nil {
				victim = s
			}
		}
	}
	upgrade := false
	if victim == nil && d.wantDirect() && !now.Before(c.upgradeTrieAt) {
		for _, s := range d.slots {
			if !s.direct {
				victim, upgrade = s, true
				break
			}
		}
	}
	d.mu.Unlock()
	forced := c.noteMisplaced(misplaced, pref != "", now)
	if victim == nil {
		return
	}
	if !forced && !d.sysfs.deviceIdle(d.Index) {
		return
	}
	if upgrade {
		c.upgradeTrieAt = now.Add(directRetry)
		// Only give up a working relay slot for a server that switches.
		conns, _, err := d.opts.Direct.DialDirect(d.ctx, 1)
		if err != nil {
			d.directRetryAt = now.Add(directRetry)
			return
		}
		conns[0].Close()
		d.log.Info("moving the device to the kernel-direct path", "device", d.Path)
		victim.conn.Close() // ServeConn ends, the slot is reported down
		return
	}
	d.log.Info("moving a direct connection to the preferred server", "device", d.Path, "from", victim.server, "to", pref, "idle", !forced)
	retire(victim.fd) // the next step sees it hung up (with LINK_DEAD)
}

// noteMisplaced tracks since when direct slots point away from the
// preferred server and reports whether they must move even while busy
// (after migrateAfter, or FollowPreferred).
func (c *ctlState) noteMisplaced(misplaced, prefKnown bool, now time.Time) (forced bool) {
	switch {
	case !misplaced:
		c.migrateSince = time.Time{}
		if prefKnown {
			c.forceMove = false // done (while the client fails over, the preferred server is unknown: keep it)
		}
		return false
	case c.migrateSince.IsZero():
		c.migrateSince = now
	}
	return c.forceMove || now.Sub(c.migrateSince) > migrateAfter
}

// FollowPreferred makes the device move its direct slots to the
// DirectDialer's preferred server now, one slot per step, even while
// requests are in flight (those on a moved slot wait for their request
// timer), instead of waiting for an idle moment. For a server switch an
// administrator asked for. It does nothing on relay slots.
func (d *Device) FollowPreferred() {
	select {
	case d.events <- ctlEvent{follow: true}:
	case <-d.ctx.Done():
	default: // the queue is full: the loop is busy and sees the move by itself
	}
}

// allEnded reports whether every tracked slot has ended (after a
// disconnect): relay slots by DISC, direct ones hung up.
func (d *Device) allEnded() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.slots {
		if s.direct && !hungUp(s.fd) {
			return false
		}
		if !s.direct {
			return false
		}
	}
	return true
}

// connectedOrUnknown reports false only when the kernel says the device
// is not connected any more.
func connectedOrUnknown(index int) bool {
	ok, err := isConnected(index)
	return err != nil || ok
}

// disconnected closes Disconnected once.
func (d *Device) disconnected() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.discSet {
		d.discSet = true
		close(d.discCh)
	}
}

// String describes a slot for logs.
func (s *slot) String() string {
	if s.direct {
		return fmt.Sprintf("direct(%s)", s.server)
	}
	return "relay"
}
