package iscsi

import (
	"errors"
	"log/slog"
)

// Task management functions (RFC 7143 section 11.5.1).
const (
	tmfAbortTask      = 1
	tmfAbortTaskSet   = 2
	tmfClearACA       = 3
	tmfClearTaskSet   = 4
	tmfLUNReset       = 5
	tmfTargetWarm     = 6
	tmfTargetCold     = 7
	tmfTaskReassign   = 8
	tmfComplete       = 0 // function complete
	tmfNoTask         = 1 // task does not exist
	tmfNoLUN          = 2 // LUN does not exist
	tmfNoReassign     = 4 // task allegiance reassignment not supported
	tmfNotSupported   = 5 // task management function not supported
	tmfFunctionMask   = 0x7f
	tmfRefITTOffset   = 20
	tmfRefCmdSNOffset = 32
)

// markAborts runs in the reader when a TMF request arrives: the tasks it
// aborts are marked at once, so that the executor skips those still
// queued and waits of the running one end. The TMF itself then queues
// behind them: its response goes out after every response of the tasks
// before it, as SAM wants.
func (s *session) markAborts(p *PDU) []*task {
	var victims []*task
	fn := p.Flags() & tmfFunctionMask
	s.tmu.Lock()
	switch fn {
	case tmfAbortTask:
		if p.LUN() != 0 {
			break
		}
		if t := s.tasks[p.U32(tmfRefITTOffset)]; t != nil && (t.cmdSN == p.U32(tmfRefCmdSNOffset) || t.immediate) {
			victims = append(victims, t)
		}
	case tmfAbortTaskSet, tmfClearTaskSet, tmfLUNReset, tmfTargetWarm, tmfTargetCold:
		for _, t := range s.tasks {
			victims = append(victims, t)
		}
	}
	s.tmu.Unlock()
	var aborted []*task
	for _, t := range victims {
		t.mu.Lock()
		if t.state == taskQueued || t.state == taskRunning {
			t.state = taskAborted
			aborted = append(aborted, t)
		}
		t.mu.Unlock()
		t.cancel()
	}
	return aborted
}

// tmf answers a task management request in the executor, after the tasks
// before it.
func (s *session) tmf(p *PDU, aborted []*task) error {
	s.retire(!p.Immediate())
	fn := p.Flags() & tmfFunctionMask
	resp := uint8(tmfComplete)
	switch fn {
	case tmfAbortTask:
		resp = s.abortResult(p, aborted)
	case tmfAbortTaskSet, tmfClearTaskSet, tmfClearACA, tmfLUNReset:
		if p.LUN() != 0 {
			resp = tmfNoLUN
			break
		}
		if fn == tmfLUNReset {
			s.prevent = false
		}
	case tmfTargetWarm, tmfTargetCold:
		s.prevent = false
	case tmfTaskReassign:
		resp = tmfNoReassign // ErrorRecoveryLevel 0
	default:
		resp = tmfNotSupported
	}
	s.logAt(slog.LevelDebug, "task management", "function", fn, "response", resp, "aborted", len(aborted))
	h := newBHS(OpTMFResp, flagFinal)
	h[2] = resp
	h.SetU32(16, p.ITT())
	if err := s.send(&h, nil, statAdvance); err != nil {
		return err
	}
	if fn == tmfTargetCold && resp == tmfComplete {
		return errColdReset // a cold reset drops the connection
	}
	return nil
}

var errColdReset = errors.New("iscsi: target cold reset")

// abortResult decides ABORT TASK's response. A task aborted before its
// response went out: function complete. No such task: function complete
// if its CmdSN is in the window and before the TMF's (the command never
// arrived, RFC 7143 section 4.2.3.3 rule b), else task does not exist
// (it completed, its response is on the way or there).
func (s *session) abortResult(p *PDU, aborted []*task) uint8 {
	if p.LUN() != 0 {
		return tmfNoLUN
	}
	if len(aborted) > 0 {
		return tmfComplete
	}
	ref, exp := p.U32(tmfRefCmdSNOffset), s.expCmdSN.Load()
	own := p.U32(24)
	if ref-exp <= s.maxCmdSN()-exp && int32(ref-own) < 0 {
		return tmfComplete
	}
	return tmfNoTask
}

// dataOut hands a Data-Out PDU to the command that solicited it; others
// are dropped (data of commands that were refused or aborted).
func (s *session) dataOut(p *PDU) {
	s.tmu.Lock()
	t := s.tasks[p.ITT()]
	s.tmu.Unlock()
	if t == nil || t.dataOut == nil {
		return
	}
	select {
	case t.dataOut <- p:
	case <-t.ctx.Done():
	}
}
