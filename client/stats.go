package client

import "time"

// Stats is a snapshot of an Image's state, for status output and tests.
type Stats struct {
	Image string // image name
	RID   uint16 // revision
	Size  int64  // virtual size in bytes

	Current    string        // address of the active server, "" while panicking
	CurrentRTT time.Duration // its RTT estimate (probe average, else live RTT)
	Panic      bool          // no active connection: failing over
	PanicFor   time.Duration // how long the panic lasts so far

	BytesRead uint64 // payload bytes received for completed reads
	Requests  uint64 // GET_BLOCK requests completed
	Pending   int    // reads waiting (queued or in flight)
	Switches  uint64 // RTT-based switches to a faster server
	Failovers uint64 // recoveries from a lost or stalled connection
	Failures  uint64 // connection failures of all servers
	LastError string // why the most recent connection failed
	Pinned    string // the server SwitchServer pinned, "" if probing chooses

	Servers []ServerStats // every known server, given ones first
}

// ServerStats describes one known server.
type ServerStats struct {
	Addr      string        // "ip:port"
	Learned   bool          // learned via GET_SERVERS
	Added     bool          // added at runtime (AddServer, SwitchServer)
	Pinned    bool          // pinned by SwitchServer
	Active    bool          // the current server
	RTT       time.Duration // average of the last probe RTTs (0: never probed)
	Samples   int           // number of RTT samples averaged
	LiveRTT   time.Duration // moving average of real request latency
	Failures  uint64        // failed connections and probes in total
	Consec    int           // failures in a row
	BestCount int           // how often it was recently the fastest
	LastError string        // the last failure
	LastErrAt time.Time     // when it happened
}

// Current returns the address of the active server, "" while failing over.
func (i *Image) Current() string {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.active == nil {
		return ""
	}
	return i.active.srv.key
}

// Stats returns a snapshot of the Image's state.
func (i *Image) Stats() Stats {
	i.mu.Lock()
	defer i.mu.Unlock()
	st := Stats{
		Image:     i.id.name,
		RID:       i.id.rid,
		Size:      i.size,
		Pending:   len(i.pending),
		BytesRead: i.bytesRead.Load(),
		Requests:  i.nreqs.Load(),
		Switches:  i.switches.Load(),
		Failovers: i.failovers.Load(),
		Failures:  i.srvErrors.Load(),
	}
	if i.lastError != nil {
		st.LastError = i.lastError.Error()
	}
	if c := i.active; c != nil {
		st.Current = c.srv.key
		st.CurrentRTT = c.srv.rttEstimate()
	} else if !i.closed {
		st.Panic = true
		st.PanicFor = time.Since(i.panicSince)
	}
	if i.pinned != nil {
		st.Pinned = i.pinned.key
	}
	for _, s := range i.servers {
		ss := ServerStats{
			Addr:      s.key,
			Learned:   s.learned,
			Added:     s.added,
			Pinned:    s == i.pinned,
			Active:    i.active != nil && i.active.srv == s,
			RTT:       s.avgRTT(),
			Samples:   s.nrtt,
			LiveRTT:   s.liveRTT,
			Failures:  s.failures,
			Consec:    s.consec,
			BestCount: s.best,
			LastErrAt: s.lastErrT,
		}
		if s.lastErr != nil {
			ss.LastError = s.lastErr.Error()
		}
		st.Servers = append(st.Servers, ss)
	}
	return st
}
