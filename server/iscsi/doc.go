// Package iscsi is the read-only iSCSI target (RFC 7143) of dnbd3-server.
// It shares the DNBD3 port: the server hands it connections whose first
// byte is 0x43 (a Login request with the immediate bit), and every image is
// a target with one logical unit, LUN 0, a read-only direct-access disk with
// 512-byte logical blocks.
//
// The package knows nothing about images or proxies: a Backend resolves
// target names to Disks and lists them for discovery, so that reads take
// the same path as DNBD3 clients' (on a proxy, absent blocks are fetched
// from the uplink).
//
// Files, one job each:
//
//	pdu.go       basic header segments, reading and writing PDUs, digests
//	keys.go      text key=value lists and the operational keys' negotiation
//	names.go     target names: NAME:RID, wwn-0x<16 hex>, names for discovery
//	login.go     the login phase (security "None", operational negotiation)
//	text.go      text requests: SendTargets discovery
//	session.go   the full feature phase: CmdSN window, NOP, logout, ordering
//	tmf.go       task management functions
//	scsi.go      the SCSI command set of a read-only disk
//	inquiry.go   INQUIRY and the vital product data pages
//	modes.go     MODE SENSE pages
//	opcodes.go   the command table and REPORT SUPPORTED OPERATION CODES
//	sense.go     status and sense data
//	target.go    Target: configuration, connections, the session list
package iscsi
