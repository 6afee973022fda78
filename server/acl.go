package server

// rpc.acl: which HTTP RPC clients may see what. Read once at startup.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// ACLFileName is the name of the RPC access list in the configuration
// directory.
const aclFileName = "rpc.acl"

// MaxACLRules is the maximum number of rules read from rpc.acl.
const maxACLRules = 100

// ACLPerm is a set of RPC permissions.
type aclPerm uint8

// RPC permissions. PermAll includes every other permission and also grants
// what has no flag of its own (q=config, q=logfile, q=altservers).
const (
	// PermStats allows q=stats, q=space and q=version (flag STATS).
	permStats aclPerm = 1 << iota
	// PermClientList allows q=clients (flag CLIENT_LIST).
	permClientList
	// PermImageList allows q=images and /cachemap (flag IMAGE_LIST).
	permImageList
	// PermMetrics allows /metrics (flag METRICS, an extension of this
	// project). PermStats grants it too (see CanScrape), so existing
	// access lists keep working.
	permMetrics
	// PermAll allows everything (flag ALL).
	permAll aclPerm = 0xFF
)

// aclFlags maps rpc.acl flag words to permissions.
var aclFlags = map[string]aclPerm{
	"ALL":         permAll,
	"STATS":       permStats,
	"CLIENT_LIST": permClientList,
	"IMAGE_LIST":  permImageList,
	"METRICS":     permMetrics,
}

// Has reports whether p grants need; PermAll grants everything.
func (p aclPerm) has(need aclPerm) bool {
	return p == permAll || p&need == need
}

// CanScrape reports whether p allows /metrics: METRICS, STATS or ALL.
func (p aclPerm) canScrape() bool {
	return p.has(permMetrics) || p.has(permStats)
}

// String returns the flag words of p as rpc.acl spells them, e.g.
// "STATS IMAGE_LIST", "ALL" or "" for none.
func (p aclPerm) String() string {
	if p == permAll {
		return "ALL"
	}
	var words []string
	for _, f := range []struct {
		p    aclPerm
		name string
	}{{permStats, "STATS"}, {permClientList, "CLIENT_LIST"}, {permImageList, "IMAGE_LIST"}, {permMetrics, "METRICS"}} {
		if p&f.p != 0 {
			words = append(words, f.name)
		}
	}
	return strings.Join(words, " ")
}

// aclRule is one line of rpc.acl.
type aclRule struct {
	prefix netip.Prefix
	perm   aclPerm
}

// ACL is the parsed rpc.acl. A nil *ACL or one without rules allows
// everything.
type ACL struct {
	rules   []aclRule
	invalid int // lines that were meant as rules but did not parse
}

// OpenByMistake reports whether the file had rule lines but none of them
// parsed: the RPC is then open to everyone, as with no file at all (the
// reference's behaviour), which is rarely what the admin meant. An absent
// file or one with only comments and blank lines is not a mistake.
func (a *ACL) openByMistake() bool {
	return a != nil && len(a.rules) == 0 && a.invalid > 0
}

// Len returns the number of rules.
func (a *ACL) Len() int {
	if a == nil {
		return 0
	}
	return len(a.rules)
}

// Allowed returns the permissions of addr: everything if there are no
// rules, else those of the first rule whose prefix contains addr, else none.
// IPv4-mapped IPv6 addresses are treated as IPv4; an IPv4 rule never matches
// an IPv6 address and vice versa.
func (a *ACL) allowed(addr netip.Addr) aclPerm {
	if a == nil || len(a.rules) == 0 {
		return permAll
	}
	addr = addr.Unmap().WithZone("")
	for _, r := range a.rules {
		if r.prefix.Contains(addr) {
			return r.perm
		}
	}
	return 0
}

// LoadACL reads rpc.acl at path. A missing file gives an ACL that allows
// everything. Lines that cannot be used are skipped with a warning.
//
// Each line is "ADDRESS[/PREFIXBITS] FLAG [FLAG...]" with the flags ALL,
// STATS, CLIENT_LIST, IMAGE_LIST and METRICS; "#" starts a comment. At most 100 rules
// are read; the first rule matching a client decides.
func loadACL(path string) (*ACL, []string, error) {
	acl, probs, err := readACL(path)
	return acl, lineWarnings(path, probs), err
}

// readACL is LoadACL with the warnings as line-numbered problems (without
// the file name).
func readACL(path string) (*ACL, []Problem, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &ACL{}, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read RPC access list: %w (fix the file's permissions or remove it to allow everyone)", err)
	}
	acl, probs := parseACL(data)
	return acl, probs, nil
}

// parseACL parses the contents of rpc.acl. The problems are warnings with
// a line number and no file name.
func parseACL(data []byte) (*ACL, []Problem) {
	acl := &ACL{}
	var probs []Problem
	warn := func(line int, format string, args ...any) {
		probs = append(probs, Problem{Line: line, Msg: fmt.Sprintf(format, args...)})
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	line := 0
	for sc.Scan() {
		line++
		r, ok, why := parseACLLine(sc.Text())
		if why != "" {
			warn(line, "%s", why)
		}
		if !ok {
			if why != "" {
				acl.invalid++
			}
			continue
		}
		if len(acl.rules) >= maxACLRules {
			warn(line, "more than %d rules; ignoring the rest", maxACLRules)
			break
		}
		acl.rules = append(acl.rules, r)
	}
	if err := sc.Err(); err != nil {
		acl.invalid++
		warn(line+1, "%v; rest of the file ignored", err)
	}
	return acl, probs
}

// parseACLLine parses one line. ok is false for blank and comment lines and
// for lines that are no valid rule (then warn says why).
func parseACLLine(text string) (r aclRule, ok bool, warn string) {
	if i := strings.IndexByte(text, '#'); i >= 0 {
		text = text[:i]
	}
	fields := strings.Fields(text)
	if len(fields) == 0 {
		return aclRule{}, false, ""
	}
	prefix, err := parseACLPrefix(fields[0])
	if err != nil {
		return aclRule{}, false, err.Error() + "; line ignored"
	}
	var unknown []string
	for _, f := range fields[1:] {
		p, known := aclFlags[f]
		if !known {
			unknown = append(unknown, f)
			continue
		}
		r.perm |= p
	}
	if len(unknown) > 0 {
		warn = fmt.Sprintf("unknown flag(s) %s ignored (valid: ALL, STATS, CLIENT_LIST, IMAGE_LIST, METRICS)", strings.Join(unknown, " "))
	}
	if r.perm == 0 {
		if warn != "" {
			warn += "; "
		}
		return aclRule{}, false, warn + fmt.Sprintf("rule for %s has no valid flag; line ignored", fields[0])
	}
	r.prefix = prefix
	return r, true, warn
}

// parseACLPrefix parses "ADDRESS" or "ADDRESS/BITS". IPv4-mapped IPv6
// prefixes of at least 96 bits become IPv4 prefixes.
func parseACLPrefix(s string) (netip.Prefix, error) {
	addrStr, bitsStr, hasBits := strings.Cut(s, "/")
	addr, err := netip.ParseAddr(addrStr)
	if err != nil {
		return netip.Prefix{}, badValuef("invalid address %q", addrStr)
	}
	addr = addr.WithZone("")
	bits := addr.BitLen()
	if hasBits {
		n, err := strconv.Atoi(bitsStr)
		if err != nil || n < 0 || n > addr.BitLen() {
			return netip.Prefix{}, badValuef("invalid prefix length %q for %s (use 0…%d)", bitsStr, addrStr, addr.BitLen())
		}
		bits = n
	}
	if addr.Is4In6() && bits >= 96 {
		addr, bits = addr.Unmap(), bits-96
	}
	return netip.PrefixFrom(addr, bits).Masked(), nil
}
