// Package protocol implements the DNBD3 wire format: the 24-byte request
// header, the 16-byte reply header, the payload serializer used by
// SELECT_IMAGE, the 20-byte server entries of GET_SERVERS and the CRC-32
// lists of GET_CRC32.
//
// The package is pure: it neither opens connections nor files (except that
// ComputeCRCList reads from an io.ReaderAt). Every decoder accepts arbitrary
// bytes without panicking and has a fuzz target.
//
// Byte order on the wire is little-endian for every header and serializer
// field, with two exceptions that come from the reference copying a sockaddr
// verbatim: the address bytes and the port of a server entry are in network
// (big-endian) order.
package protocol
