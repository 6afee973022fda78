package iscsi

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// cmdWindow is how many commands an initiator may have queued (MaxCmdSN -
// ExpCmdSN + 1). Commands run one after the other, so a deeper queue only
// costs memory.
const cmdWindow = 32

// pingTag is the target transfer tag of our NOP-In pings.
const pingTag = 0x0000_1000

// readBuffer is the connection's read buffer: a whole window of command
// PDUs in one read(2).
const readBuffer = 4096

// session is one connection and its session (MaxConnections=1): the login,
// then the full feature phase. The reader goroutine (run) reads PDUs,
// keeps the CmdSN window and answers NOP-Outs and text requests itself;
// SCSI commands, task management and logout go in CmdSN order to the
// executor goroutine. Every PDU is written whole under wmu.
type session struct {
	t      *Target
	c      net.Conn
	pr     pduReader
	remote netip.AddrPort
	local  netip.AddrPort
	log    *slog.Logger

	p       params
	disk    Disk // nil in discovery sessions and before the login
	isid    [6]byte
	tsih    uint16
	started time.Time

	ctx    context.Context // ends with the connection
	cancel context.CancelFunc

	wmu     sync.Mutex
	statSN  uint32      // guarded by wmu: the next StatSN
	writeBy time.Time   // guarded by wmu
	out     []byte      // guarded by wmu: PDUs not written yet
	batch   atomic.Bool // the reader answers a burst: writes may wait

	cmdBase  uint32        // ExpCmdSN after the login
	expCmdSN atomic.Uint32 // next CmdSN expected
	retired  atomic.Uint32 // non-immediate commands completed (MaxCmdSN)

	// Reader state.
	held    map[uint32]*PDU // commands received ahead of ExpCmdSN
	textOut []byte          // rest of a long text response
	textIn  []byte          // text request continued over several PDUs
	textTTT uint32

	queue   chan work
	pending atomic.Int32 // work queued or running in the executor

	tmu   sync.Mutex
	tasks map[uint32]*task // queued and running SCSI commands by ITT

	// Executor state.
	prevent bool   // PREVENT ALLOW MEDIUM REMOVAL
	nextTTT uint32 // target transfer tag of the last R2T

	bytesSent atomic.Uint64
}

func newSession(t *Target, c net.Conn, r *bufio.Reader) *session {
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{
		t:       t,
		c:       c,
		pr:      pduReader{r: bufio.NewReaderSize(r, readBuffer), maxData: ourMaxRecvDataSegment},
		remote:  addrPort(c.RemoteAddr()),
		local:   addrPort(c.LocalAddr()),
		log:     t.log,
		p:       defaultParams(),
		started: time.Now(),
		ctx:     ctx,
		cancel:  cancel,
		held:    map[uint32]*PDU{},
		tasks:   map[uint32]*task{},
	}
	return s
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// close ends the session: waits are cancelled and the disk released.
func (s *session) close() {
	s.cancel()
	s.wmu.Lock()
	s.c.SetDeadline(time.Now()) // no more writes
	s.wmu.Unlock()
	if s.disk != nil {
		s.disk.Close()
	}
}

func (s *session) logAt(level slog.Level, msg string, args ...any) {
	if !s.log.Enabled(context.Background(), level) {
		return
	}
	s.log.Log(context.Background(), level, msg, append([]any{"client", s.remote.String()}, args...)...)
}

// logEnd logs why a connection ended.
func (s *session) logEnd(msg string, err error) {
	switch {
	case err == nil:
		s.logAt(slog.LevelInfo, msg)
	case isClosed(err) || errors.Is(err, context.Canceled):
		s.logAt(slog.LevelInfo, msg, "reason", "connection closed")
	default:
		s.logAt(slog.LevelInfo, msg, "err", err)
	}
}

// work is one item for the executor.
type work struct {
	task   *task // a SCSI command
	pdu    *PDU  // a TMF or logout request
	marked []*task
}

// task is a SCSI command from its arrival until its response.
type task struct {
	pdu       *PDU
	itt       uint32
	cmdSN     uint32
	immediate bool

	ctx    context.Context // cancelled by an abort
	cancel context.CancelFunc

	mu      sync.Mutex
	state   taskState
	dataOut chan *PDU // Data-Out PDUs for a command that solicited them
	r2ts    uint32    // R2Ts sent (executor only)
}

type taskState uint8

const (
	taskQueued    taskState = iota
	taskRunning             // the executor works on it
	taskAborted             // aborted: no response is sent
	taskResponded           // completed, the response went out
)

// run is the full feature phase: it returns when the connection ends.
func (s *session) run() error {
	s.queue = make(chan work, cmdWindow+16)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.execute()
	}()
	err := s.readLoop()
	s.cancel()
	close(s.queue)
	wg.Wait()
	return err
}

// readLoop reads PDUs until the connection fails or closes.
func (s *session) readLoop() error {
	silent := 0
	var readBy time.Time
	for {
		// The deadline moves only every few seconds: deadlines are not
		// free, and commands come fast.
		timeout := s.t.cfg.Timeout()
		if now := time.Now(); readBy.Sub(now) < timeout-timeout/8 {
			readBy = now.Add(timeout)
			s.c.SetReadDeadline(readBy)
		}
		// Wait for the first byte of a PDU: a timeout here is silence; in
		// the middle of a PDU it is the end.
		if _, err := s.pr.r.Peek(1); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && s.ctx.Err() == nil {
				// Silent for a timeout: ping; after 4 timeouts without a
				// PDU the initiator is gone (a DNBD3 client's idle limit).
				if silent++; silent < 4 {
					if err := s.ping(); err != nil {
						return err
					}
					readBy = time.Time{}
					continue
				}
				return errors.New("iscsi: initiator silent for 4 client timeouts")
			}
			return err
		}
		p, err := s.pr.read()
		if err != nil {
			return err
		}
		silent = 0
		// More of a burst waiting: the answers may go out together.
		s.batch.Store(s.pr.r.Buffered() >= BHSLen)
		if err := s.handle(p); err != nil {
			return err
		}
		if !s.batch.Load() {
			continue
		}
		if s.pr.r.Buffered() < BHSLen {
			s.batch.Store(false)
			if err := s.flush(); err != nil {
				return err
			}
		}
	}
}

// handle dispatches one PDU of the full feature phase.
func (s *session) handle(p *PDU) error {
	switch p.Opcode() {
	case OpDataOut:
		s.dataOut(p)
		return nil
	case OpNOPOut, OpSCSICmd, OpTMFReq, OpTextReq, OpLogoutReq:
		return s.accept(p)
	case OpSNACKReq:
		// ErrorRecoveryLevel 0: no SNACK.
		return s.reject(p, rejectNotSupported)
	default:
		s.logAt(slog.LevelDebug, "rejecting PDU", "opcode", p.Opcode())
		return s.reject(p, rejectProtocol)
	}
}

// maxCmdSN returns the highest CmdSN the initiator may send.
func (s *session) maxCmdSN() uint32 {
	return s.cmdBase + s.retired.Load() + cmdWindow - 1
}

// accept passes a request through the CmdSN window: immediate ones at
// once, the others in CmdSN order. Requests outside the window are
// ignored, as RFC 7143 section 4.2.2.1 wants.
func (s *session) accept(p *PDU) error {
	if p.Immediate() {
		return s.dispatch(p)
	}
	sn, exp := p.U32(24), s.expCmdSN.Load()
	if sn-exp > s.maxCmdSN()-exp {
		s.logAt(slog.LevelDebug, "ignoring request outside the CmdSN window", "cmdSN", sn, "expCmdSN", exp, "maxCmdSN", s.maxCmdSN())
		return nil
	}
	if sn != exp {
		s.held[sn] = p // at most cmdWindow entries: sn is in the window
		return nil
	}
	for {
		s.expCmdSN.Store(exp + 1)
		if err := s.dispatch(p); err != nil {
			return err
		}
		exp++
		var ok bool
		if p, ok = s.held[exp]; !ok {
			return nil
		}
		delete(s.held, exp)
	}
}

// dispatch handles a request whose turn has come.
func (s *session) dispatch(p *PDU) error {
	counted := !p.Immediate()
	switch p.Opcode() {
	case OpNOPOut:
		err := s.nopOut(p)
		s.retire(counted)
		return err
	case OpTextReq:
		err := s.text(p)
		s.retire(counted)
		return err
	case OpSCSICmd:
		if s.disk == nil {
			s.retire(counted)
			return s.reject(p, rejectProtocol) // discovery session
		}
		if s.pending.Load() == 0 && s.quick(p) {
			return s.inline(p)
		}
		return s.queueCommand(p)
	case OpTMFReq:
		s.enqueue(work{pdu: p, marked: s.markAborts(p)})
		return nil
	case OpLogoutReq:
		s.enqueue(work{pdu: p})
		return nil
	}
	return nil
}

// enqueue hands work to the executor.
func (s *session) enqueue(w work) {
	s.pending.Add(1)
	s.queue <- w
}

// quick reports whether a command can run in the reader: it needs no
// Data-Out and its reads do not wait for an uplink. With the executor
// idle, running it at once keeps the order and saves two goroutine
// switches per command.
func (s *session) quick(p *PDU) bool {
	if needsDataOut(p) {
		return false
	}
	cdb := p.BHS[32:48]
	switch cdb[0] {
	case opRead6, opRead10, opRead12, opRead16, opVerify10, opVerify12, opVerify16, opPrefetch10, opPrefetch16:
		lba, blocks := lbaRange(cdb)
		if !s.checkRange(lba, blocks) {
			return true // an error answer
		}
		return s.disk.Ready(int64(lba)*blockSize, int64(blocks)*blockSize)
	}
	return true
}

// inline runs a quick command in the reader.
func (s *session) inline(p *PDU) error {
	p.Data = nil
	t := &task{pdu: p, itt: p.ITT(), cmdSN: p.U32(24), immediate: p.Immediate(), ctx: s.ctx, state: taskRunning}
	return s.scsi(t)
}

// retire counts a non-immediate request as done: the window moves on.
func (s *session) retire(counted bool) {
	if counted {
		s.retired.Add(1)
	}
}

// queueCommand registers a SCSI command and queues it for the executor.
func (s *session) queueCommand(p *PDU) error {
	itt := p.ITT()
	keep := needsDataOut(p)
	if !keep {
		p.Data = nil // immediate data of refused writes is not kept
	}
	ctx, cancel := context.WithCancel(s.ctx)
	t := &task{pdu: p, itt: itt, cmdSN: p.U32(24), immediate: p.Immediate(), ctx: ctx, cancel: cancel}
	if keep {
		t.dataOut = make(chan *PDU, 1)
	}
	s.tmu.Lock()
	_, dup := s.tasks[itt]
	if !dup {
		s.tasks[itt] = t
	}
	s.tmu.Unlock()
	if dup {
		cancel()
		s.retire(!p.Immediate())
		return s.reject(p, rejectInvalidField)
	}
	s.enqueue(work{task: t})
	return nil
}

// execute runs queued work in order until the queue closes.
func (s *session) execute() {
	for w := range s.queue {
		if s.ctx.Err() != nil {
			continue // draining after the connection ended
		}
		var err error
		switch {
		case w.task != nil:
			err = s.runTask(w.task)
		case w.pdu.Opcode() == OpTMFReq:
			err = s.tmf(w.pdu, w.marked)
		case w.pdu.Opcode() == OpLogoutReq:
			err = s.logout(w.pdu)
		}
		s.pending.Add(-1)
		if err != nil {
			if !isClosed(err) && !errors.Is(err, context.Canceled) && err != errLoggedOut {
				s.logAt(slog.LevelDebug, "closing connection", "err", err)
			}
			s.c.Close()
			s.cancel()
		}
	}
}

// runTask executes a SCSI command unless it was aborted.
func (s *session) runTask(t *task) error {
	defer func() {
		t.cancel()
		s.tmu.Lock()
		delete(s.tasks, t.itt)
		s.tmu.Unlock()
	}()
	t.mu.Lock()
	if t.state == taskAborted {
		t.mu.Unlock()
		s.retire(!t.immediate)
		return nil
	}
	t.state = taskRunning
	t.mu.Unlock()
	return s.scsi(t)
}

// nopOut answers a NOP-Out: a ping from the initiator gets a NOP-In with
// the same data; an answer to our ping needs none (that it arrived reset
// the silence count).
func (s *session) nopOut(p *PDU) error {
	if p.ITT() == reserved {
		return nil
	}
	h := newBHS(OpNOPIn, flagFinal)
	copy(h[8:16], p.BHS[8:16])
	h.SetU32(16, p.ITT())
	h.SetU32(20, reserved)
	data := p.Data
	if len(data) > s.p.maxSendData {
		data = data[:s.p.maxSendData]
	}
	return s.send(&h, data, statAdvance)
}

// ping sends a NOP-In that asks for a NOP-Out in return.
func (s *session) ping() error {
	h := newBHS(OpNOPIn, flagFinal)
	h.SetU32(16, reserved)
	h.SetU32(20, pingTag)
	return s.send(&h, nil, statCurrent)
}

// logout answers a logout request: closing the session or the
// connection (the same here) ends the connection; removing a connection
// for recovery is not supported (ErrorRecoveryLevel 0).
func (s *session) logout(p *PDU) error {
	s.retire(!p.Immediate())
	h := newBHS(OpLogoutResp, flagFinal)
	h.SetU32(16, p.ITT())
	if reason := p.Flags() & 0x7f; reason > 1 {
		h[2] = 2 // connection recovery is not supported
		return s.send(&h, nil, statAdvance)
	}
	if err := s.send(&h, nil, statAdvance); err != nil {
		return err
	}
	s.logAt(slog.LevelDebug, "initiator logged out")
	return errLoggedOut
}

var errLoggedOut = errors.New("iscsi: logged out")

// Reject reasons (RFC 7143 section 11.17.1).
const (
	rejectProtocol     = 0x04
	rejectNotSupported = 0x05
	rejectInvalidField = 0x09
)

// reject answers a PDU with a Reject carrying its header.
func (s *session) reject(p *PDU, reason uint8) error {
	h := newBHS(OpReject, flagFinal)
	h[2] = reason
	h.SetU32(16, reserved)
	return s.send(&h, p.BHS[:], statAdvance)
}
