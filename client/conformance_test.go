package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/protocol"
)

// TestCapturedReferenceTraffic plays the reference server's side of a
// session from ../shared/testdata/wire over a pipe: the client's requests
// must be byte-identical to dnbd3-fuse's, and it must accept the real
// replies, including a GET_SERVERS reply stamped with an unrelated handle.
func TestCapturedReferenceTraffic(t *testing.T) {
	t.Parallel()
	sel := testutil.ReadWire(t, "select_image.txt")
	srvs := testutil.ReadWire(t, "get_servers.txt")
	crc := testutil.ReadWire(t, "get_crc32.txt")

	serverSide := make(chan net.Conn, 1)
	cfg := fastConfig(t, "crctest", "127.0.0.1:15304")
	cfg.KeepaliveInterval = time.Hour
	cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr != "127.0.0.1:15304" {
			return nil, errors.New("unreachable in this test")
		}
		a, b := net.Pipe()
		serverSide <- b
		return a, nil
	}
	script := make(chan error, 1)
	go func() {
		script <- func() error {
			c := <-serverSide
			defer c.Close()
			expect := func(want []byte) error {
				got := make([]byte, len(want))
				if _, err := io.ReadFull(c, got); err != nil {
					return err
				}
				if !bytes.Equal(got, want) {
					return fmt.Errorf("request differs from the reference client's: got %x want %x", got, want)
				}
				return nil
			}
			// dnbd3-fuse's first handshake (rid 0) and the server's reply.
			if err := expect(sel[0].Bytes); err != nil {
				return err
			}
			c.Write(sel[1].Bytes)
			// GET_SERVERS, answered with the capture whose handle is 0x5555.
			if err := expect(srvs[0].Bytes); err != nil {
				return err
			}
			c.Write(srvs[3].Bytes)
			// One read: the header must be a GET_BLOCK of the right range.
			var hb [protocol.RequestSize]byte
			if _, err := io.ReadFull(c, hb[:]); err != nil {
				return err
			}
			req, err := protocol.ParseRequest(hb[:])
			if err != nil || req.Cmd != protocol.CmdGetBlock || req.Size != 131072 || req.Offset != 1<<20 || req.Hops != 0 {
				return errors.New("bad GET_BLOCK " + req.String())
			}
			rep := protocol.Reply{Cmd: protocol.CmdGetBlock, Size: req.Size, Handle: req.Handle}.Marshal()
			c.Write(append(rep[:], testutil.GenImage(1<<20, 131072)...))
			// GET_CRC32 and the real reply.
			if err := expect(crc[0].Bytes); err != nil {
				return err
			}
			c.Write(crc[1].Bytes)
			io.Copy(io.Discard, c) // until the client closes
			return nil
		}()
	}()

	img := openT(t, cfg)
	if img.RID() != 1 || img.Size() != 41955328 || img.Name() != "crctest" {
		t.Fatalf("image %q rid %d size %d", img.Name(), img.RID(), img.Size())
	}
	eventually(t, 2*time.Second, "learned servers", func() bool { return len(img.Stats().Servers) == 3 })
	if st := img.Stats(); st.Servers[1].Addr != "127.0.0.2:5003" || st.Servers[2].Addr != "[::1]:5004" || !st.Servers[2].Learned {
		t.Fatalf("servers: %+v", st.Servers)
	}
	buf := make([]byte, 131072)
	if _, err := img.ReadAt(buf, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, testutil.GenImage(1<<20, 131072)) {
		t.Fatal("data differs")
	}
	list, err := img.CRCList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0] != 0xdc5b7530 || list[1] != 0x89a22282 || list[2] != 0x470f2919 {
		t.Fatalf("CRC list %x", list)
	}
	img.Close()
	if err := <-script; err != nil {
		t.Fatal(err)
	}
}
