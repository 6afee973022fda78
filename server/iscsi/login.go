package iscsi

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Login stages (CSG and NSG).
const (
	stageSecurity    = 0
	stageOperational = 1
	stageFullFeature = 3
)

// login runs the login phase: security negotiation with AuthMethod=None,
// operational negotiation, over as many PDUs as the initiator uses. On
// success the session is in the full feature phase; on a failure the
// initiator got a login response with the status, if the connection
// still worked.
func (s *session) login(ctx context.Context) error {
	deadline := time.Now().Add(s.t.cfg.Timeout())
	s.c.SetDeadline(deadline)
	stage := -1 // before the first PDU
	var text []byte
	first := true
	for {
		p, err := s.pr.read()
		if err != nil {
			return err
		}
		if p.Opcode() != OpLoginReq {
			return fmt.Errorf("iscsi: opcode %#x during the login", p.Opcode())
		}
		if first {
			copy(s.isid[:], p.BHS[8:14])
			s.tsih = p.U16(14)
			s.cmdBase = p.U32(24)
			s.expCmdSN.Store(s.cmdBase)
			s.statSN = p.U32(28)
		}
		csg, nsg := int(p.Flags()>>2&3), int(p.Flags()&3)
		transit, cont := p.Flags()&flagTransit != 0, p.Flags()&flagContinue != 0
		resp := loginResponse(p, csg)
		if err := s.checkLoginPDU(p, first, stage, csg, nsg, transit, cont); err != nil {
			return s.failLogin(resp, err)
		}
		first = false
		stage = csg
		if len(text)+len(p.Data) > maxTextLen {
			return s.failLogin(resp, loginErr(loginInitiator, "login text too long"))
		}
		text = append(text, p.Data...)
		if cont {
			// More text follows: acknowledge with an empty response.
			if err := s.sendLogin(resp, nil); err != nil {
				return err
			}
			continue
		}
		kvs, err := parseText(text)
		text = text[:0]
		if err != nil {
			return s.failLogin(resp, loginErr(loginInitiator, err.Error()))
		}
		out, err := s.loginKeys(ctx, kvs, csg)
		if err != nil {
			return s.failLogin(resp, err)
		}
		if transit {
			if csg == stageSecurity && !s.p.authDone {
				// Initiators that offer no AuthMethod get None, too.
				s.p.authDone = true
			}
			resp[1] |= flagTransit | byte(nsg)
			stage = nsg
		}
		if transit && nsg == stageFullFeature {
			return s.enterFullFeature(resp, out)
		}
		if err := s.sendLogin(resp, out); err != nil {
			return err
		}
	}
}

// enterFullFeature ends a successful login: the session gets its handle,
// is listed, and the final login response is sent with out's keys.
func (s *session) enterFullFeature(resp BHS, out []byte) error {
	if s.p.sessionType == "Normal" && s.disk == nil {
		return s.failLogin(resp, loginErr(loginMissing, "TargetName missing"))
	}
	s.tsih = s.t.newTSIH()
	resp.SetU16(14, s.tsih)
	s.p.finish()
	// Listed before the initiator learns it is logged in, so a session
	// it can use is always in the list.
	s.t.register(s)
	if err := s.sendLogin(resp, out); err != nil {
		return err
	}
	s.pr.headerDigest, s.pr.dataDigest = s.p.headerDigest, s.p.dataDigest
	s.c.SetDeadline(time.Time{})
	s.writeBy = time.Time{} // the next write sets a fresh deadline
	return nil
}

// checkLoginPDU checks a login request's stages and identifiers.
func (s *session) checkLoginPDU(p *PDU, first bool, stage, csg, nsg int, transit, cont bool) error {
	switch {
	case p.BHS[3] > 0: // VersionMin
		return loginErr(loginVersion, "iSCSI version "+strconv.Itoa(int(p.BHS[3]))+" or later")
	case csg != stageSecurity && csg != stageOperational:
		return loginErr(loginInvalid, "invalid current stage "+strconv.Itoa(csg))
	case transit && cont:
		return loginErr(loginInvalid, "transit and continue together")
	case transit && (nsg == 2 || nsg <= csg):
		return loginErr(loginInvalid, "invalid next stage "+strconv.Itoa(nsg))
	case first && s.tsih != 0:
		// Adding a connection to (or reinstating one of) a session: we
		// keep no session without its connection.
		return loginErr(loginNoSession, "TSIH "+strconv.Itoa(int(s.tsih))+" is not a session of this target")
	case !first && [6]byte(p.BHS[8:14]) != s.isid:
		return loginErr(loginInitiator, "ISID changed during the login")
	case !first && csg < stage:
		return loginErr(loginInitiator, "login went back a stage")
	}
	return nil
}

// loginKeys negotiates one request's keys. The first request must name
// the initiator and, for a normal session, the target, which is opened.
func (s *session) loginKeys(ctx context.Context, kvs []kv, csg int) ([]byte, error) {
	firstText := s.p.initiatorName == ""
	out, err := s.p.negotiate(kvs)
	if err != nil {
		return nil, err
	}
	if firstText {
		if s.p.initiatorName == "" {
			return nil, loginErr(loginMissing, "InitiatorName missing")
		}
		if s.p.sessionType == "Normal" {
			if s.p.targetName == "" {
				return nil, loginErr(loginMissing, "TargetName missing")
			}
			d, err := s.t.cfg.Backend.Open(ctx, s.p.targetName)
			switch {
			case errors.Is(err, ErrTargetNotFound):
				return nil, loginErr(loginNotFound, err.Error())
			case err != nil:
				return nil, loginErr(loginResources, err.Error())
			}
			s.disk = d
			// RFC 7143 section 13.9: the first response of a normal
			// session carries the portal group tag.
			out = appendKV(out, "TargetPortalGroupTag", "1")
			out = appendKV(out, "TargetAlias", strings.ToValidUTF8(d.Name(), "_")+":"+strconv.Itoa(int(d.RID())))
		}
	}
	if csg == stageOperational {
		out = s.p.declare(out)
	}
	if len(out) > s.p.maxSendData {
		return nil, loginErr(loginTarget, "login response longer than the initiator's MaxRecvDataSegmentLength")
	}
	return out, nil
}

// loginResponse starts the response to a login request.
func loginResponse(p *PDU, csg int) BHS {
	h := newBHS(OpLoginResp, byte(csg<<2))
	copy(h[8:16], p.BHS[8:16]) // ISID and TSIH
	h.SetU32(16, p.ITT())
	return h
}

// sendLogin sends a login response.
func (s *session) sendLogin(h BHS, text []byte) error {
	s.c.SetWriteDeadline(time.Now().Add(s.t.cfg.Timeout()))
	return s.send(&h, text, statAdvance)
}

// failLogin sends a login response with the failure's status and returns
// the failure.
func (s *session) failLogin(h BHS, err error) error {
	var le *loginError
	if !errors.As(err, &le) {
		le = &loginError{3, 0, err.Error()}
	}
	h[1] = h[1] &^ (flagTransit | 3)
	h[36], h[37] = le.class, le.detail
	h.SetU16(14, 0)
	s.sendLogin(h, nil)
	return err
}
