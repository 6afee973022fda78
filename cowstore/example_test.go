package cowstore_test

import (
	"bytes"
	"fmt"
	"log"
	"os"

	"github.com/dnbd3go/dnbd3go/cowstore"
)

// Make a read-only image writable: create a session, write, flush and close
// it, then load it again (the reference client's -c and -L).
func Example() {
	dir, err := os.MkdirTemp("", "cow-session")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// The image below the overlay: anything with ReadAt and Size, usually a
	// *client.Image. Here 1 MiB of '.' in memory.
	remote := bytes.NewReader(bytes.Repeat([]byte{'.'}, 1<<20))
	opts := cowstore.Options{Remote: remote, ImageName: "disk.img", RID: 1}

	cow, err := cowstore.Create(dir, opts)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := cow.WriteAt([]byte("hello"), 8192); err != nil {
		log.Fatal(err)
	}
	if err := cow.Flush(); err != nil { // durable from here on
		log.Fatal(err)
	}
	if err := cow.Close(); err != nil {
		log.Fatal(err)
	}

	// Load checks that the session belongs to the same image and revision.
	cow, err = cowstore.Load(dir, opts)
	if err != nil {
		log.Fatal(err)
	}
	defer cow.Close()
	buf := make([]byte, 9)
	if _, err := cow.ReadAt(buf, 8190); err != nil {
		log.Fatal(err)
	}
	dirty, _ := cow.Counts()
	fmt.Printf("%s revision %d: %d bytes\n", cow.ImageName(), cow.RID(), cow.Size())
	fmt.Printf("%q\n", buf) // the written bytes, the remote's around them
	fmt.Println("clusters to upload:", dirty)
	// Output:
	// disk.img revision 1: 1048576 bytes
	// "..hello.."
	// clusters to upload: 1
}
