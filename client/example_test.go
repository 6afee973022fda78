package client_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/dnbd3go/dnbd3go/server"
)

// Open an image on a DNBD3 server and read all of it.
func ExampleOpen() {
	// A server with one 1 MiB image, disk.img revision 1 (see startServer).
	base, err := os.MkdirTemp("", "dnbd3-images")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(base)
	image := bytes.Repeat([]byte("dnbd3go!"), 1<<17)
	if err := os.WriteFile(filepath.Join(base, "disk.img.r1"), image, 0o644); err != nil {
		log.Fatal(err)
	}
	addr, stop := startServer(base)
	defer stop()

	img, err := client.Open(context.Background(), client.Config{
		Servers: []string{addr}, // "host", "host:port"; the default port is 5003
		Image:   "disk.img",
		RID:     0, // the latest revision
	})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	fmt.Printf("%s revision %d: %d bytes\n", img.Name(), img.RID(), img.Size())

	// An Image is an io.ReaderAt.
	buf := make([]byte, img.Size())
	n, err := img.ReadAt(buf, 0)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("read %d bytes, %q..., same as the file: %v\n", n, buf[:8], sha256.Sum256(buf) == sha256.Sum256(image))
	// Output:
	// disk.img revision 1: 1048576 bytes
	// read 1048576 bytes, "dnbd3go!"..., same as the file: true
}

// startServer runs a dnbd3go server in-process on a loopback port that serves
// the images below base; stop shuts it down.
func startServer(base string) (addr string, stop func()) {
	cfg := server.DefaultConfig()
	cfg.BasePath = base
	srv, err := server.New(server.Options{Config: cfg}) // no configuration files
	if err != nil {
		log.Fatal(err)
	}
	ln, err := server.Listen("127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, ln) }()
	return ln.Addr().String(), func() { cancel(); <-done }
}
