// Command sinkmerger is a benchmark peer: a merger that accepts the v1 API
// and throws the uploads away, so a benchmark measures the uploader's cost
// on the client, not a real merger's disk.
//
//	sinkmerger 127.0.0.1:PORT
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: sinkmerger ADDR")
		os.Exit(2)
	}
	var updates, bytes atomic.Int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch p := strings.ToLower(r.URL.Path); p {
		case "/v1/file/create":
			io.WriteString(w, "00000000-0000-4000-8000-000000000000")
		case "/v1/file/update":
			n, _ := io.Copy(io.Discard, r.Body)
			updates.Add(1)
			bytes.Add(n)
		case "/v1/file/merge":
			io.WriteString(w, "Merge started")
		case "/stats":
			fmt.Fprintf(w, "%d %d\n", updates.Load(), bytes.Load())
		default:
			http.NotFound(w, r)
		}
	})
	log.Fatal(http.ListenAndServe(os.Args[1], nil))
}
