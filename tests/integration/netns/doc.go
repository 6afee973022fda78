// Package netns holds the multi-host scenarios of dnbd3go: an origin
// server, caching proxies and clients on separate hosts, each host a Linux
// network namespace that the tests create themselves, joined by veth pairs,
// with the link between the central site and room B shaped by tc (tbf) to
// a WAN-like rate.
//
// Topology (addresses are the same in every test; each test gets its own
// namespaces, so tests never share servers, caches or links):
//
//	 central                     roomB                        roomC
//	+--------------+  100 Mbit  +------------------+         +--------------+
//	| origin :5003 |------------| proxy B :5003    |---------| proxy C :5003|
//	| 10.213.1.1   |   (tbf)    | clients          | (fast)  | clients      |
//	+--------------+ 10.213.1.2 +------------------+ 10.213.2.2 -----------+
//	                             10.213.2.1
//
// Room B's clients reach proxy B over its own address (loopback speed);
// room C is only used by the chain and cycle scenarios and cannot route to
// central (everything it gets passes proxy B).
//
// The tests need root and `ip netns` (iproute2's ip and tc). Without them
// they skip with "SKIP: needs root and network namespaces (ip netns): …",
// visible with -v. They run on the host, no VM needed:
//
//	go test -count=1 -v ./tests/integration/netns/
//	go test -count=1 -v -run Chain ./tests/integration/netns/
//
// TestMain builds the commands (./cmd/...) once into a temporary directory.
// Every namespace is named dnbd3t-<pid>-<n>-<host>; everything a test
// creates (namespaces, links, processes, files) is removed by t.Cleanup,
// also after a failure or panic, and a new run first removes what a crashed
// earlier run left behind (namespaces with the prefix dnbd3t- whose test
// process is gone). Server logs are printed when a test fails.
package netns
