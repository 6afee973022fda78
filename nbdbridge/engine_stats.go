package nbdbridge

import (
	"sync/atomic"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/promhist"
)

// EngineStats are the counters of an Engine since it was created.
type EngineStats struct {
	// Connections is the number of connections being served now;
	// TotalConnections counts every connection ever served.
	Connections      int64  `json:"connections"`
	TotalConnections uint64 `json:"totalConnections"`
	// InFlight is the number of requests received and not yet answered.
	InFlight int64 `json:"inFlight"`
	// Requests answered successfully, by command.
	Reads       uint64 `json:"reads"`
	Writes      uint64 `json:"writes"`
	Flushes     uint64 `json:"flushes"`
	Trims       uint64 `json:"trims"`
	WriteZeroes uint64 `json:"writeZeroes"`
	// BytesRead and BytesWritten count payload bytes of successful READs
	// and WRITEs (WRITE_ZEROES and TRIM are not counted).
	BytesRead    uint64 `json:"bytesRead"`
	BytesWritten uint64 `json:"bytesWritten"`
	// Errors counts requests answered with an error, BackendErrors those
	// of them where the backend failed (the rest were invalid requests).
	Errors        uint64 `json:"errors"`
	BackendErrors uint64 `json:"backendErrors"`
}

type statCounters struct {
	connections, totalConns atomic.Int64
	inFlight                atomic.Int64
	reads, writes, flushes  atomic.Uint64
	trims, writeZeroes      atomic.Uint64
	bytesRead, bytesWritten atomic.Uint64
	errors, backendErrors   atomic.Uint64
	latency                 [len(LatencyCommands)]promhist.Hist
}

// LatencyCommands names the commands whose latency the engine measures,
// in the order of Engine.Latency's result.
var LatencyCommands = [...]string{"read", "write", "flush", "trim", "write_zeroes", "other"}

// latencySlot maps a command to its LatencyCommands index.
func latencySlot(typ uint16) int {
	switch typ {
	case wireCmdRead:
		return 0
	case wireCmdWrite:
		return 1
	case wireCmdFlush:
		return 2
	case wireCmdTrim:
		return 3
	case wireCmdWriteZeroes:
		return 4
	}
	return 5
}

// observe records the latency of a request read at start whose reply
// was written now (answered with an error or not); requests that were
// not sampled (zero start) are skipped.
func (s *statCounters) observe(typ uint16, start time.Duration) {
	if start != 0 {
		s.latency[latencySlot(typ)].Observe(promhist.Now() - start)
	}
}

// Latency returns the latency histograms (from reading a request to
// writing its reply; one request in promhist.SampleEvery per connection
// is timed) by command, in the order of LatencyCommands.
func (e *Engine) Latency() [len(LatencyCommands)]promhist.Snapshot {
	var out [len(LatencyCommands)]promhist.Snapshot
	for i := range out {
		out[i].Add(&e.st.latency[i])
	}
	return out
}

// Stats returns a snapshot of the engine's counters.
func (e *Engine) Stats() EngineStats {
	s := &e.st
	return EngineStats{
		Connections:      s.connections.Load(),
		TotalConnections: uint64(s.totalConns.Load()),
		InFlight:         s.inFlight.Load(),
		Reads:            s.reads.Load(),
		Writes:           s.writes.Load(),
		Flushes:          s.flushes.Load(),
		Trims:            s.trims.Load(),
		WriteZeroes:      s.writeZeroes.Load(),
		BytesRead:        s.bytesRead.Load(),
		BytesWritten:     s.bytesWritten.Load(),
		Errors:           s.errors.Load(),
		BackendErrors:    s.backendErrors.Load(),
	}
}
