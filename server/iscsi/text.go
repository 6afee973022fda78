package iscsi

import (
	"net/netip"
	"strconv"
	"strings"
)

// textTag is the target transfer tag of a text exchange that continues.
const textTag = 0x0000_2000

// text answers a text request. SendTargets=All in a discovery session
// lists every target; SendTargets= (empty) or with a target name in a
// normal session describes the session's target. Other keys are not
// renegotiated in the full feature phase. A response longer than the
// initiator's MaxRecvDataSegmentLength goes out in parts: each part's
// empty follow-up request fetches the next (RFC 7143 section 11.11).
func (s *session) text(p *PDU) error {
	h := newBHS(OpTextResp, 0)
	copy(h[8:16], p.BHS[8:16])
	h.SetU32(16, p.ITT())
	h.SetU32(20, reserved)
	ttt := p.U32(20)
	if ttt != reserved && ttt == s.textTTT && len(s.textOut) > 0 && len(p.Data) == 0 {
		return s.sendTextPart(&h)
	}
	s.textOut, s.textTTT = nil, reserved
	if len(s.textIn)+len(p.Data) > maxTextLen {
		s.textIn = nil
		return s.reject(p, rejectProtocol)
	}
	s.textIn = append(s.textIn, p.Data...)
	if p.Flags()&flagContinue != 0 {
		// The request goes on in the next PDU: acknowledge this part.
		h.SetU32(20, textTag)
		return s.send(&h, nil, statAdvance)
	}
	kvs, err := parseText(s.textIn)
	s.textIn = nil
	if err != nil {
		return s.reject(p, rejectProtocol)
	}
	var out []byte
	for _, x := range kvs {
		if x.key != "SendTargets" {
			v := "Reject"
			if _, known := knownKeys[x.key]; !known {
				v = "NotUnderstood"
			}
			out = appendKV(out, x.key, v)
			continue
		}
		out = s.sendTargets(out, x.value)
	}
	s.textOut = out
	return s.sendTextPart(&h)
}

// sendTextPart sends as much of the pending text response as fits in one
// PDU; the last part has the F bit.
func (s *session) sendTextPart(h *BHS) error {
	part := s.textOut
	if len(part) > s.p.maxSendData {
		part = part[:s.p.maxSendData]
		s.textOut = s.textOut[len(part):]
		s.textTTT = textTag
		h[1] = flagContinue
		h.SetU32(20, textTag)
	} else {
		s.textOut, s.textTTT = nil, reserved
		h[1] = flagFinal
		h.SetU32(20, reserved)
	}
	return s.send(h, part, statAdvance)
}

// sendTargets appends the answer to SendTargets=value: TargetName and
// TargetAddress (this connection's local address) of each target meant.
func (s *session) sendTargets(out []byte, value string) []byte {
	var names []string
	switch {
	case value == "All" && s.p.sessionType == "Discovery":
		names = s.t.cfg.Backend.Targets()
	case value == "All":
		return appendKV(out, "SendTargets", "Reject")
	case value == "" && s.disk != nil:
		names = []string{s.p.targetName}
	case value == "":
		return out // a discovery session has no target of its own
	case s.disk != nil && value == s.p.targetName:
		names = []string{value}
	default:
		// A named target: listed if it exists.
		d, err := s.t.cfg.Backend.Open(s.ctx, value)
		if err != nil {
			return out
		}
		d.Close()
		names = []string{value}
	}
	addr := portal(s.local)
	for _, n := range names {
		out = appendKV(out, "TargetName", n)
		out = appendKV(out, "TargetAddress", addr)
	}
	return out
}

// portal formats an address as a TargetAddress value with portal group 1.
func portal(a netip.AddrPort) string {
	host := a.Addr().String()
	if a.Addr().Is6() {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.Itoa(int(a.Port())) + ",1"
}

// knownKeys are the standard keys (RFC 7143 section 13, RFC 7144): answered
// "Reject" rather than "NotUnderstood" outside the login.
var knownKeys = func() map[string]struct{} {
	m := map[string]struct{}{}
	for _, k := range strings.Fields(`HeaderDigest DataDigest MaxConnections SendTargets TargetName
		InitiatorName TargetAlias InitiatorAlias TargetAddress TargetPortalGroupTag InitialR2T
		ImmediateData MaxRecvDataSegmentLength MaxBurstLength FirstBurstLength DefaultTime2Wait
		DefaultTime2Retain MaxOutstandingR2T DataPDUInOrder DataSequenceInOrder ErrorRecoveryLevel
		SessionType AuthMethod TaskReporting iSCSIProtocolLevel IFMarker OFMarker IFMarkInt OFMarkInt`) {
		m[k] = struct{}{}
	}
	return m
}()
