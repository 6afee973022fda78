package iscsi

import (
	"encoding/binary"
	"time"
)

// Outgoing PDUs. Every PDU is stamped with its sequence numbers and
// queued under wmu, so PDUs leave in StatSN order. While the reader has
// more commands of a burst buffered, responses collect in out and leave
// in one write(2) when the burst is done; large Data-In segments go
// without a copy (Data.SendTo: splice or sendfile) after what is pending.

const (
	flushAt = 64 << 10 // pending bytes that are written at once
	copyMax = 16 << 10 // Data-In segments up to this size are copied into out
)

// How send fills in StatSN.
type statMode uint8

const (
	statNone    statMode = iota // the PDU has no StatSN (Data-In without status)
	statCurrent                 // the next StatSN, not advanced (R2T, pings)
	statAdvance                 // a status: this StatSN, then the next
)

// send queues one PDU with its data segment from memory, filling in
// StatSN, ExpCmdSN and MaxCmdSN, and writes it unless a burst is being
// answered.
func (s *session) send(h *BHS, data []byte, mode statMode) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.stampLocked(h, mode)
	s.out = appendPDU(s.out, h, data, s.pr.headerDigest, s.pr.dataDigest)
	return s.flushLocked(false)
}

// sendData sends one Data-In PDU with k bytes of src at off: copied into
// the output when small or when it needs padding or a digest, else
// without a copy (Data.SendTo).
func (s *session) sendData(h *BHS, src Data, off, k int64, mode statMode) error {
	s.bytesSent.Add(uint64(k))
	if s.t.cfg.Sent != nil {
		s.t.cfg.Sent(k)
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.stampLocked(h, mode)
	h.SetDataLen(int(k))
	if k > copyMax && k%4 == 0 && !s.pr.dataDigest {
		if err := s.flushLocked(true); err != nil {
			return err
		}
		s.refreshWriteDeadline()
		return src.SendTo(s.c, header(h, s.pr.headerDigest), off, k)
	}
	s.out = append(s.out, header(h, s.pr.headerDigest)...)
	n := len(s.out)
	pad := pad4(int(k))
	s.out = append(s.out, make([]byte, int(k)+pad)...)
	if _, err := src.ReadAt(s.out[n:n+int(k)], off); err != nil {
		s.out = s.out[:n-len(header(h, s.pr.headerDigest))]
		return err
	}
	if s.pr.dataDigest {
		s.out = binary.LittleEndian.AppendUint32(s.out, crc32c(s.out[n:]))
	}
	return s.flushLocked(false)
}

// flush writes what is pending.
func (s *session) flush() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.flushLocked(true)
}

// flushLocked writes the pending output, unless a burst is being
// answered and less than flushAt is pending. The caller holds wmu.
func (s *session) flushLocked(force bool) error {
	if len(s.out) == 0 || !force && s.batch.Load() && len(s.out) < flushAt {
		return nil
	}
	s.refreshWriteDeadline()
	_, err := s.c.Write(s.out)
	if cap(s.out) > 4*flushAt {
		s.out = nil // a large Data-In from memory: do not keep the buffer
	} else {
		s.out = s.out[:0]
	}
	return err
}

// stampLocked sets the sequence numbers of an outgoing PDU.
func (s *session) stampLocked(h *BHS, mode statMode) {
	switch mode {
	case statCurrent:
		h.SetU32(24, s.statSN)
	case statAdvance:
		h.SetU32(24, s.statSN)
		s.statSN++
	}
	h.SetU32(28, s.expCmdSN.Load())
	h.SetU32(32, s.maxCmdSN())
}

// refreshWriteDeadline moves the write deadline to now + timeout, every
// few seconds only. The caller holds wmu.
func (s *session) refreshWriteDeadline() {
	d := s.t.cfg.Timeout()
	now := time.Now()
	if s.writeBy.Sub(now) < d-d/8 {
		s.writeBy = now.Add(d)
		s.c.SetWriteDeadline(s.writeBy)
	}
}
