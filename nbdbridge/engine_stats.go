package nbdbridge

import "sync/atomic"

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
