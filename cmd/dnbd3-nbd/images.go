package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dnbd3go/dnbd3go/client"
	"github.com/spf13/pflag"
)

// rpcImage is one entry of a server's RPC image list (GET /query?q=images,
// the reference's field names).
type rpcImage struct {
	ID       int    `json:"id"`
	Name     string `json:"name"`
	RID      uint16 `json:"rid"`
	Size     int64  `json:"size"`
	Complete int    `json:"complete"`
	Users    int    `json:"users"`
	Problems int    `json:"problems"`
}

// maxRPCReply bounds the RPC answer read from a server.
const maxRPCReply = 32 << 20

func runImages(ctx context.Context, args []string, s stdio) int {
	var hosts string
	var asJSON bool
	var timeout time.Duration
	fs := pflag.NewFlagSet("dnbd3-nbd images", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(s.err)
	fs.StringVarP(&hosts, "host", "h", "", `server(s), space-separated "host[:port] ..." (default port 5003)`)
	fs.BoolVar(&asJSON, "json", false, "print the server's image list as JSON")
	fs.DurationVar(&timeout, "timeout", 5*time.Second, "how long to wait for each server")
	addVersionFlag(fs)
	setHelp(fs, s, "Usage: dnbd3-nbd images -h HOST[:PORT] [--json] [--timeout D]\n\n"+
		"Lists the images a DNBD3 server offers (name, revision, size, how complete a proxy's copy is),\n"+
		"like nbd-client -l or qemu-nbd --list. It asks the server's HTTP RPC on the same port\n"+
		"(GET /query?q=images), which the server's rpc.acl may refuse (IMAGE_LIST).\n")
	if code, ok := parseFlags(fs, args, s, "images"); !ok {
		return code
	}
	if hosts == "" {
		fmt.Fprintln(s.err, "dnbd3-nbd images: -h HOST is required (see --help)")
		return exitUsage
	}
	if timeout <= 0 {
		fmt.Fprintln(s.err, "dnbd3-nbd images: --timeout must be positive")
		return exitUsage
	}
	specs := strings.Fields(hosts)
	for _, h := range specs {
		if _, _, err := client.ParseServerSpec(h); err != nil {
			fmt.Fprintf(s.err, "dnbd3-nbd images: -h: %v\n", err)
			return exitUsage
		}
	}
	code := exitOK
	for k, h := range specs {
		imgs, err := fetchImages(ctx, h, timeout)
		if err != nil {
			fmt.Fprintf(s.err, "dnbd3-nbd images: %s: %v\n", h, err)
			code = exitError
			continue
		}
		if len(specs) > 1 && !asJSON {
			if k > 0 {
				fmt.Fprintln(s.out)
			}
			fmt.Fprintf(s.out, "%s:\n", h)
		}
		printImages(s.out, imgs, asJSON)
	}
	return code
}

// fetchImages asks the server spec for its image list.
func fetchImages(ctx context.Context, spec string, timeout time.Duration) ([]rpcImage, error) {
	host, port, err := client.ParseServerSpec(spec)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	url := "http://" + net.JoinHostPort(host, strconv.Itoa(int(port))) + "/query?q=images"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("RPC request: %w (is a dnbd3-server listening there?)", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxRPCReply))
	if err != nil {
		return nil, fmt.Errorf("read the RPC reply: %w", err)
	}
	switch {
	case resp.StatusCode == http.StatusForbidden:
		return nil, fmt.Errorf("the server's rpc.acl refuses this host the image list (%q): it needs a rule with IMAGE_LIST or ALL for this address", strings.TrimSpace(string(body)))
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("RPC answered %s: %q", resp.Status, strings.TrimSpace(string(body)))
	}
	var v struct {
		Images []rpcImage `json:"images"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("the RPC reply is not the expected JSON: %w", err)
	}
	return v.Images, nil
}

// printImages prints a server's images as a table or as JSON.
func printImages(w io.Writer, imgs []rpcImage, asJSON bool) {
	if asJSON {
		if imgs == nil {
			imgs = []rpcImage{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(imgs)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tRID\tSIZE\tBYTES\tCOMPLETE\tUSERS")
	for _, im := range imgs {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d%%\t%d\n", printable(im.Name), im.RID, humanSize(im.Size), im.Size, im.Complete, im.Users)
	}
	tw.Flush()
}

// printable replaces control characters in a name from the network.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, s)
}

// humanSize formats n bytes with a binary unit (KiB, MiB, ...).
func humanSize(n int64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	v, u := float64(n), -1
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + string(units[u]) + "iB"
}
