// Package nbdbridge exports a Backend as an NBD device: to the Linux kernel
// as /dev/nbdX (socketpairs handed over with generic netlink), and to NBD
// clients such as QEMU and libnbd tools over unix or TCP sockets.
//
// The transmission engine is our own (go-nbd supplies the protocol
// definitions): one reader per connection, a bounded worker pool shared by
// all connections of an export, one writer per connection, replies matched
// by cookie and possibly out of order, the read payload complete before its
// reply header is written, and errors answered with an errno and no
// payload. FLUSH, FUA, TRIM and WRITE_ZEROES are handled. Reads of a
// backend that is an AsyncReader, and requests alone in flight, skip the
// goroutine hand-offs.
//
// A device's kernel connections ("slots", slots.go) are relay slots
// (socketpairs the engine serves) or, for read-only devices whose servers
// offer it, direct slots: TCP connections to the server in NBD mode that
// the kernel reads itself (docs/kernel-direct.md). One control loop per
// device replaces slots that die, falls back to relay slots and moves to
// the preferred server.
package nbdbridge
