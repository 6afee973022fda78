// Package client is the DNBD3 client library: it opens an image on one of
// several DNBD3 servers or proxies and gives it as a read-only
// io.ReaderAt of Size() bytes. Everything in dnbd3go that reads images
// over DNBD3 uses it: the kernel NBD bridge, `dnbd3-nbd get` and the
// proxy's uplinks.
//
// # Connection
//
// Open tries the configured servers (one attempt per server, 200 ms apart,
// first valid SELECT_IMAGE wins) and keeps one active TCP connection. Reads
// are split into GET_BLOCK requests of at most Config.MaxRequest bytes and
// pipelined: a sender goroutine writes request headers in batches, one
// receiver goroutine reads replies, matches GET_BLOCK and CMD_ERROR replies
// by handle (replies through a proxy arrive out of order) and reads the
// payload straight into the caller's buffer. Other replies (KEEPALIVE,
// GET_SERVERS, GET_CRC32) are dispatched by command, never by handle: the
// reference server stamps them with the handle of the last GET_BLOCK.
//
// A KEEPALIVE goes out every 10 s. Unless Config.Sticky is set, GET_SERVERS
// is sent after every (re)connect and the servers learned are merged into
// the server list (at most MaxServers).
//
// # Probing, switching, failover
//
// See probe.go (RTT probing and switching to a faster server) and
// failover.go (panic mode). In short: background probes measure every
// server's RTT (new connection, SELECT_IMAGE, 4 KiB read); a clearly faster
// server (3/4 × current > best + threshold) takes over. When the active
// connection breaks, stalls (oldest read older than max(5 × RTT, 1 s) with
// nothing received for as long) or answers an in-range read with CMD_ERROR,
// every server is tried in parallel at once and the first that completes
// the handshake with the same name, revision and size gets every
// unanswered read re-sent. A read is never lost: it fails only after
// Config.Deadline (0 = never) or when the Image is closed.
//
// # Asynchronous reads and the NBD switch
//
// StartRead/SendStarted (async.go) read without a goroutine waiting per
// read, for the kernel bridge's relay path. DialNBD (nbdmode.go) opens
// connections to the Image's current server switched to the NBD
// transmission protocol (a dnbd3go extension), which the bridge hands to
// the kernel (docs/kernel-direct.md).
package client
