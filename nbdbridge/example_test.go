package nbdbridge_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/nbdbridge"
	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Serve a Backend on a unix socket, as `dnbd3-nbd serve` does for QEMU and
// libnbd tools, and read from it with a minimal NBD client (nbdRead).
func ExampleEngine_ServeListener() {
	dir, err := os.MkdirTemp("", "nbd-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "nbd.sock")

	// Any Backend works: a cowstore.Overlay, a client.Image (read-only)
	// or, here, 1 MiB in memory.
	disk := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	engine := nbdbridge.NewEngine(nbdbridge.NewMemoryBackendFrom(disk), nbdbridge.EngineOptions{ReadOnly: true})
	defer engine.Close()
	ln, err := nbdbridge.ListenAddr("unix:" + socket) // or "tcp:127.0.0.1:10809"
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- engine.ServeListener(ctx, ln, "disk", "an example export") }()
	defer func() { stop(); <-done }() // returns once every client has left

	// What `nbdcopy nbd+unix:///disk?socket=PATH` or QEMU would read.
	size, data, err := nbdRead(socket, "disk", 4090, 12)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("export of %d bytes, read-only: %v\n", size, engine.ReadOnly())
	fmt.Printf("%q\n", data)
	// Output:
	// export of 1048576 bytes, read-only: true
	// "abcdef012345"
}

// nbdRead is the smallest NBD client: it connects to the unix socket path,
// selects the export with NBD_OPT_EXPORT_NAME, reads length bytes at off
// and disconnects. It returns the export size and the data.
func nbdRead(path, export string, off uint64, length uint32) (size uint64, data []byte, err error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	be := binary.BigEndian

	var hello protocol.NegotiationNewstyleHeader
	if err := binary.Read(conn, be, &hello); err != nil {
		return 0, nil, err
	}
	if hello.OldstyleMagic != protocol.NEGOTIATION_MAGIC_OLDSTYLE || hello.OptionMagic != protocol.NEGOTIATION_MAGIC_OPTION {
		return 0, nil, fmt.Errorf("%s: not a newstyle NBD server", path)
	}
	const fixedNewstyle, noZeroes, optExportName = 1, 2, 1
	var req bytes.Buffer
	binary.Write(&req, be, uint32(fixedNewstyle|noZeroes))
	binary.Write(&req, be, protocol.NegotiationOptionHeader{
		OptionMagic: protocol.NEGOTIATION_MAGIC_OPTION, ID: optExportName, Length: uint32(len(export)),
	})
	req.WriteString(export)
	if _, err := conn.Write(req.Bytes()); err != nil {
		return 0, nil, err
	}
	var info struct {
		Size  uint64
		Flags uint16
	}
	if err := binary.Read(conn, be, &info); err != nil {
		return 0, nil, err
	}

	read := protocol.TransmissionRequestHeader{
		RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST, Type: protocol.TRANSMISSION_TYPE_REQUEST_READ,
		Handle: 1, Offset: off, Length: length,
	}
	if err := binary.Write(conn, be, read); err != nil {
		return 0, nil, err
	}
	var reply protocol.TransmissionReplyHeader
	if err := binary.Read(conn, be, &reply); err != nil {
		return 0, nil, err
	}
	if reply.Error != 0 {
		return 0, nil, fmt.Errorf("NBD read: error %d", reply.Error)
	}
	data = make([]byte, length)
	if _, err := io.ReadFull(conn, data); err != nil {
		return 0, nil, err
	}
	disc := protocol.TransmissionRequestHeader{
		RequestMagic: protocol.TRANSMISSION_MAGIC_REQUEST, Type: protocol.TRANSMISSION_TYPE_REQUEST_DISC,
	}
	return info.Size, data, binary.Write(conn, be, disc)
}
