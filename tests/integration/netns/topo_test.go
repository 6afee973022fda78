package netns

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Addresses of the topology (see doc.go). Every test has its own
// namespaces, so all of them use the same addresses.
const (
	centralIP   = "10.213.1.1" // central, on the shaped link to room B
	roomBUpIP   = "10.213.1.2" // room B, on the shaped link to central
	roomBDownIP = "10.213.2.1" // room B, on the fast link to room C
	roomCIP     = "10.213.2.2" // room C
	dnbd3Port   = 5003

	// linkMbit is the rate of the central <-> room B link.
	linkMbit = 100
	// linkBytesPerSec is linkMbit in bytes per second.
	linkBytesPerSec = linkMbit * 1000 * 1000 / 8
)

// topology is one test's set of namespaces.
type topology struct {
	t      *testing.T
	prefix string
	// central, roomB, roomC are the namespace names ("" if not created).
	central, roomB, roomC string
}

// newTopology creates central and room B joined by a link shaped to
// linkMbit in both directions, plus room C behind room B when withRoomC.
// Everything is removed when the test ends.
func newTopology(t *testing.T, withRoomC bool) *topology {
	t.Helper()
	return newTopologyAt(t, withRoomC, linkMbit)
}

// newTopologyAt is newTopology with the link shaped to mbit Mbit/s.
func newTopologyAt(t *testing.T, withRoomC bool, mbit int) *topology {
	t.Helper()
	requireNetns(t)
	tp := &topology{t: t, prefix: fmt.Sprintf("%s%d-%d-", nsPrefix, os.Getpid(), topoSeq.Add(1))}
	tp.central = tp.addNS("central")
	tp.roomB = tp.addNS("roomB")
	// The shaped WAN link.
	tp.veth("wan0", tp.central, centralIP, tp.roomB, roomBUpIP)
	for _, ns := range []string{tp.central, tp.roomB} {
		// tbf on each end's egress: the link is shaped in both directions.
		// burst must exceed rate/HZ; 256 KiB also holds a GSO super-packet.
		tp.run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "wan0", "root", "tbf",
			"rate", fmt.Sprintf("%dmbit", mbit), "burst", "256kb", "latency", "50ms")
	}
	if withRoomC {
		tp.roomC = tp.addNS("roomC")
		tp.veth("lan0", tp.roomB, roomBDownIP, tp.roomC, roomCIP)
		// No forwarding in room B and no route from room C to central:
		// whatever room C gets passes proxy B.
	}
	return tp
}

// addNS creates a namespace with loopback up and registers its removal.
func (tp *topology) addNS(host string) string {
	name := tp.prefix + host
	tp.ip("netns", "add", name)
	tp.t.Cleanup(func() { deleteNamespace(name) })
	tp.ip("-n", name, "link", "set", "lo", "up")
	return name
}

// veth joins namespaces a and b with a veth pair named dev on both ends
// (created in a, its peer moved to b), addresses aIP and bIP (/24), up.
func (tp *topology) veth(dev, a, aIP, b, bIP string) {
	tp.t.Helper()
	tp.ip("-n", a, "link", "add", "name", dev, "type", "veth", "peer", "name", dev, "netns", b)
	tp.ip("-n", a, "addr", "add", aIP+"/24", "dev", dev)
	tp.ip("-n", b, "addr", "add", bIP+"/24", "dev", dev)
	tp.ip("-n", a, "link", "set", dev, "up")
	tp.ip("-n", b, "link", "set", dev, "up")
}

func (tp *topology) ip(args ...string) { tp.t.Helper(); tp.run("ip", args...) }

func (tp *topology) run(name string, args ...string) {
	tp.t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		tp.t.Fatalf("setting up the topology: %s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// dialIn opens a TCP connection from inside namespace ns.
func dialIn(ctx context.Context, ns, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// listenIn opens a TCP listener inside namespace ns.
func listenIn(ns, addr string) (net.Listener, error) {
	var ln net.Listener
	err := inNetns(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	return ln, err
}

// waitListening waits until something accepts connections on addr in ns.
func waitListening(ns, addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		c, err := dialIn(ctx, ns, addr)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
