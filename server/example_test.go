package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"

	"github.com/dnbd3go/dnbd3go/server"
)

// Start a server in-process on a loopback port and ask its HTTP RPC, which
// shares the port with DNBD3, which images it serves.
func ExampleServer_Serve() {
	dir, err := os.MkdirTemp("", "dnbd3-server")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// An image is a file <name>.r<rid> below the base path: here 1 MiB.
	base := filepath.Join(dir, "images")
	os.Mkdir(base, 0o755)
	image := bytes.Repeat([]byte("dnbd3go!"), 1<<17)
	if err := os.WriteFile(filepath.Join(base, "disk.img.r1"), image, 0o644); err != nil {
		log.Fatal(err)
	}

	// The configuration a server.conf would give; dir is the configuration
	// directory (no alt-servers, no rpc.acl: the RPC is open to everyone).
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
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { stop(); <-done }() // Serve returns once every connection is closed

	resp, err := http.Get("http://" + ln.Addr().String() + "/query?q=images")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	var reply struct {
		Images []struct {
			Name string `json:"name"`
			RID  int    `json:"rid"`
			Size int64  `json:"size"`
		} `json:"images"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&reply); err != nil {
		log.Fatal(err)
	}
	for _, img := range reply.Images {
		fmt.Printf("%s revision %d, %d bytes\n", img.Name, img.RID, img.Size)
	}
	// Output:
	// disk.img revision 1, 1048576 bytes
}
