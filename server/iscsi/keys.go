package iscsi

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Limits of the text exchanged in login and text requests.
const (
	maxKeyLen   = 63    // RFC 7143 section 6.1
	maxValueLen = 8192  // generous: standard values are far shorter
	maxTextLen  = 65536 // all PDUs of one request together
)

// Our side of the operational keys.
const (
	// ourMaxRecvDataSegment is the largest data segment we accept. The
	// target only receives small PDUs (text, NOP-Out pings, the data of
	// VERIFY with byte compare), so a small value keeps every
	// connection's memory small.
	ourMaxRecvDataSegment = 8192
	ourMaxBurst           = 1 << 20
	ourFirstBurst         = 65536
	// maxDataInSegment bounds the Data-In PDUs we send whatever the
	// initiator accepts: they are built in memory when digests are on.
	maxDataInSegment = 256 << 10
)

// kv is one key=value pair of a text segment.
type kv struct{ key, value string }

var errBadText = errors.New("iscsi: malformed text key=value list")

// parseText splits a text segment ("key=value" strings each ended by a NUL
// byte; the last NUL may be missing) into its pairs, in order.
func parseText(b []byte) ([]kv, error) {
	var out []kv
	for len(b) > 0 {
		i := bytes.IndexByte(b, 0)
		item := b
		if i >= 0 {
			item, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(item) == 0 {
			continue // stray NUL padding
		}
		eq := bytes.IndexByte(item, '=')
		if eq <= 0 {
			return nil, fmt.Errorf("%w: %q", errBadText, truncate(string(item), 64))
		}
		out = append(out, kv{string(item[:eq]), string(item[eq+1:])})
	}
	return out, nil
}

// appendKV appends key=value and its NUL to a text segment.
func appendKV(b []byte, key, value string) []byte {
	b = append(b, key...)
	b = append(b, '=')
	b = append(b, value...)
	return append(b, 0)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// params are the negotiated parameters of a connection and its session.
type params struct {
	initiatorName  string
	initiatorAlias string
	targetName     string
	sessionType    string // "Normal" or "Discovery"
	authDone       bool   // AuthMethod=None agreed

	headerDigest bool
	dataDigest   bool
	maxSendData  int // the initiator's MaxRecvDataSegmentLength
	maxBurst     int
	firstBurst   int
	immediate    bool
	initialR2T   bool

	declared bool           // our MaxRecvDataSegmentLength was sent
	seen     map[string]int // keys offered so far (each only once)
}

// defaultParams are RFC 7143's defaults, which hold until negotiated.
func defaultParams() params {
	return params{
		sessionType: "Normal",
		maxSendData: 8192,
		maxBurst:    262144,
		firstBurst:  65536,
		immediate:   true,
		initialR2T:  true,
		seen:        map[string]int{},
	}
}

// loginError is a login failure with its status class and detail.
type loginError struct {
	class, detail uint8
	msg           string
}

func (e *loginError) Error() string {
	return fmt.Sprintf("login status %d/%#02x: %s", e.class, e.detail, e.msg)
}

// Login status codes (RFC 7143 section 11.13.5): class in the high byte.
const (
	loginInitiator   = 0x0200 // initiator error
	loginAuth        = 0x0201 // authentication failure
	loginNotFound    = 0x0203 // target not found
	loginVersion     = 0x0205 // unsupported version
	loginMissing     = 0x0207 // missing parameter
	loginSessionType = 0x0209 // session type not supported
	loginNoSession   = 0x020a // session does not exist
	loginInvalid     = 0x020b // invalid request during login
	loginTarget      = 0x0300 // target error
	loginResources   = 0x0302 // out of resources
)

// loginErr returns a login failure with status code (class and detail).
func loginErr(code uint16, msg string) error {
	return &loginError{uint8(code >> 8), uint8(code), msg}
}

// negotiate answers the keys of one login request and applies them. It
// returns the reply text; a non-nil error fails the login.
func (p *params) negotiate(kvs []kv) ([]byte, error) {
	var out []byte
	for _, x := range kvs {
		if len(x.key) > maxKeyLen {
			return nil, loginErr(loginInitiator, "key name too long: "+truncate(x.key, 64))
		}
		if p.seen[x.key]++; p.seen[x.key] > 1 {
			return nil, loginErr(loginInitiator, "key offered twice: "+x.key)
		}
		if len(x.value) > maxValueLen {
			out = appendKV(out, x.key, "Reject")
			continue
		}
		reply, err := p.negotiateKey(x.key, x.value)
		if err != nil {
			return nil, err
		}
		if reply != "" {
			out = appendKV(out, x.key, reply)
		}
	}
	return out, nil
}

// negotiateKey applies one key and returns the answer ("" for declarative
// keys that get none).
func (p *params) negotiateKey(key, v string) (string, error) {
	if f, ok := keyHandlers[key]; ok {
		return f(p, key, v)
	}
	return "NotUnderstood", nil
}

// keyHandler applies one login or text key and returns the answer.
type keyHandler func(p *params, key, v string) (string, error)

// keyHandlers holds every key a target negotiates (RFC 7143 section 13).
var keyHandlers = map[string]keyHandler{
	"InitiatorName":            (*params).initiatorNameKey,
	"InitiatorAlias":           func(p *params, _, v string) (string, error) { p.initiatorAlias = v; return "", nil },
	"TargetName":               func(p *params, _, v string) (string, error) { p.targetName = v; return "", nil },
	"SessionType":              (*params).sessionTypeKey,
	"AuthMethod":               (*params).authMethodKey,
	"HeaderDigest":             (*params).digestKey,
	"DataDigest":               (*params).digestKey,
	"MaxConnections":           numKey(1, 1, 65535, nil),
	"ErrorRecoveryLevel":       numKey(0, 0, 2, nil),
	"MaxOutstandingR2T":        numKey(1, 1, 65535, nil),
	"DefaultTime2Retain":       numKey(0, 0, 3600, nil),
	"DefaultTime2Wait":         defaultTime2WaitKey,
	"MaxBurstLength":           numKey(ourMaxBurst, 512, 1<<24-1, func(p *params) *int { return &p.maxBurst }),
	"FirstBurstLength":         numKey(ourFirstBurst, 512, 1<<24-1, func(p *params) *int { return &p.firstBurst }),
	"MaxRecvDataSegmentLength": (*params).maxRecvDataKey,
	"InitialR2T":               yesNoKey(func(p *params, _ string) string { p.initialR2T = true; return "Yes" }),  // OR with our Yes: we never take unsolicited data
	"ImmediateData":            yesNoKey(func(p *params, v string) string { p.immediate = v == "Yes"; return v }), // AND with our Yes
	"DataPDUInOrder":           yesNoKey(func(*params, string) string { return "Yes" }),                           // OR with our Yes
	"DataSequenceInOrder":      yesNoKey(func(*params, string) string { return "Yes" }),
	"IFMarker":                 fixedKey("No"), // RFC 3720 markers: AND with our No
	"OFMarker":                 fixedKey("No"),
	"IFMarkInt":                fixedKey("Irrelevant"),
	"OFMarkInt":                fixedKey("Irrelevant"),
	"TaskReporting":            fixedKey("RFC3720"),
	// Sent by targets or in text requests only:
	"TargetAlias":          fixedKey("Irrelevant"),
	"TargetAddress":        fixedKey("Irrelevant"),
	"TargetPortalGroupTag": fixedKey("Irrelevant"),
	"SendTargets":          fixedKey("Irrelevant"),
}

func (p *params) initiatorNameKey(_, v string) (string, error) {
	if v == "" {
		return "", loginErr(loginMissing, "empty InitiatorName")
	}
	p.initiatorName = v
	return "", nil
}

func (p *params) sessionTypeKey(_, v string) (string, error) {
	if v != "Normal" && v != "Discovery" {
		return "", loginErr(loginSessionType, "SessionType "+truncate(v, 32))
	}
	p.sessionType = v
	return "", nil
}

func (p *params) authMethodKey(_, v string) (string, error) {
	for _, m := range strings.Split(v, ",") {
		if m == "None" {
			p.authDone = true
			return "None", nil
		}
	}
	return "", loginErr(loginAuth, "only AuthMethod=None is supported, offered "+truncate(v, 64))
}

// digestKey picks the initiator's first choice we support.
func (p *params) digestKey(key, v string) (string, error) {
	choice := ""
	for _, m := range strings.Split(v, ",") {
		if m == "CRC32C" || m == "None" {
			choice = m
			break
		}
	}
	if choice == "" {
		return "Reject", nil
	}
	if key == "HeaderDigest" {
		p.headerDigest = choice == "CRC32C"
	} else {
		p.dataDigest = choice == "CRC32C"
	}
	return choice, nil
}

func (p *params) maxRecvDataKey(_, v string) (string, error) {
	n, ok := parseNum(v, 512, 1<<24-1)
	if !ok {
		return "Reject", nil
	}
	p.maxSendData = int(n)
	return "", nil // declarative: ours is sent once, by declare
}

func defaultTime2WaitKey(_ *params, _, v string) (string, error) {
	n, ok := parseNum(v, 0, 3600)
	if !ok {
		return "Reject", nil
	}
	return strconv.FormatUint(n, 10), nil // max(v, 0)
}

// numKey answers a numerical key with the minimum of the offer and ours,
// storing the result in the field store returns (nil: not kept).
func numKey(ours, lo, hi uint64, store func(*params) *int) keyHandler {
	return func(p *params, _, v string) (string, error) {
		var dst *int
		if store != nil {
			dst = store(p)
		}
		return numMin(v, ours, lo, hi, dst)
	}
}

// yesNoKey rejects anything but Yes or No and lets answer decide.
func yesNoKey(answer func(p *params, v string) string) keyHandler {
	return func(p *params, _, v string) (string, error) {
		if v != "Yes" && v != "No" {
			return "Reject", nil
		}
		return answer(p, v), nil
	}
}

// fixedKey always gives the same answer.
func fixedKey(answer string) keyHandler {
	return func(*params, string, string) (string, error) { return answer, nil }
}

// parseNum parses a decimal or 0x-hex number within [lo, hi].
func parseNum(v string, lo, hi uint64) (uint64, bool) {
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil || n < lo || n > hi {
		return 0, false
	}
	return n, true
}

// numMin answers a numeric key whose result is the minimum of both
// offers, storing it in dst if set.
func numMin(v string, ours, lo, hi uint64, dst *int) (string, error) {
	n, ok := parseNum(v, lo, hi)
	if !ok {
		return "Reject", nil
	}
	n = min(n, ours)
	if dst != nil {
		*dst = int(n)
	}
	return strconv.FormatUint(n, 10), nil
}

// declare appends the keys the target states on its own in the
// operational stage: our MaxRecvDataSegmentLength, once.
func (p *params) declare(out []byte) []byte {
	if p.declared {
		return out
	}
	p.declared = true
	return appendKV(out, "MaxRecvDataSegmentLength", strconv.Itoa(ourMaxRecvDataSegment))
}

// finish checks the negotiated values for consistency when the login ends.
func (p *params) finish() {
	if p.firstBurst > p.maxBurst {
		p.firstBurst = p.maxBurst
	}
}
