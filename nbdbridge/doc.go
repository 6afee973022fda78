// Package nbdbridge exports a Backend as an NBD device: to the Linux kernel
// as /dev/nbdX (socketpairs handed over with generic netlink), and to NBD
// clients such as QEMU and libnbd tools over unix or TCP sockets.
//
// The transmission engine is our own (go-nbd supplies the protocol
// definitions): one reader per connection, a bounded worker pool shared by
// all connections of an export, one writer per connection, replies matched
// by cookie and possibly out of order, the read payload complete before its
// reply header is written, and errors answered with an errno and no
// payload. FLUSH, FUA, TRIM and WRITE_ZEROES are handled.
package nbdbridge
