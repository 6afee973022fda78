package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// listenURL is one entry of Urls or --listen: where to accept requests.
type listenURL struct {
	raw    string // as given
	scheme string // "http" or "https"
	host   string // without brackets: "localhost", "*", "+", "" or an IP or name
	port   int
}

// tls reports whether the URL asks for HTTPS.
func (u listenURL) tls() bool { return u.scheme == "https" }

// parseListenURL parses a Kestrel-style listen URL: http://HOST:PORT or
// https://HOST:PORT, where HOST may be an IP address, localhost, or * or +
// for all interfaces; the port defaults to 80 or 443. A bare HOST:PORT
// (or :PORT) means http.
func parseListenURL(s string) (listenURL, error) {
	u := listenURL{raw: s, scheme: "http"}
	rest := strings.TrimSpace(s)
	if scheme, after, ok := strings.Cut(rest, "://"); ok {
		u.scheme = strings.ToLower(scheme)
		rest = after
	}
	if u.scheme != "http" && u.scheme != "https" {
		return u, fmt.Errorf("listen URL %q: scheme %q is not supported: use http:// or https://", s, u.scheme)
	}
	if hostport, path, ok := strings.Cut(rest, "/"); ok {
		if path != "" {
			return u, fmt.Errorf("listen URL %q: a path is not supported (only scheme, host and port)", s)
		}
		rest = hostport
	}
	host, port := rest, ""
	if i := strings.LastIndexByte(rest, ':'); i >= 0 && !strings.HasSuffix(rest, "]") {
		host, port = rest[:i], rest[i+1:]
	}
	if strings.HasPrefix(host, "[") != strings.HasSuffix(host, "]") {
		return u, fmt.Errorf("listen URL %q: unbalanced brackets around the address", s)
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.ContainsAny(host, "@?#") || (strings.Contains(host, ":") && !isIP(host)) {
		return u, fmt.Errorf("listen URL %q: bad host %q", s, host)
	}
	u.host = host
	switch {
	case port != "":
		n, err := strconv.Atoi(port)
		if err != nil || n < 0 || n > 65535 {
			return u, fmt.Errorf("listen URL %q: bad port %q", s, port)
		}
		u.port = n
	case u.tls():
		u.port = 443
	default:
		u.port = 80
	}
	return u, nil
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// isLoopback reports whether the URL listens on loopback addresses only.
func (u listenURL) isLoopback() bool {
	if strings.EqualFold(u.host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(u.host)
	return err == nil && a.IsLoopback()
}

// boundListener is an open listener and the URL it serves.
type boundListener struct {
	net.Listener
	url listenURL
}

// listenAll opens the listeners for urls, like Kestrel: localhost is
// 127.0.0.1 and ::1 (the latter is optional), *, + and an empty host are
// all interfaces, an IP address is that address, and any other host name
// means all interfaces (with a warning). On error every listener opened
// so far is closed.
func listenAll(ctx context.Context, urls []listenURL, log *slog.Logger) ([]boundListener, error) {
	var lc net.ListenConfig
	var out []boundListener
	fail := func(err error) ([]boundListener, error) {
		for _, l := range out {
			l.Close()
		}
		return nil, err
	}
	for _, u := range urls {
		switch {
		case strings.EqualFold(u.host, "localhost"):
			ln, err := lc.Listen(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(u.port)))
			if err != nil {
				return fail(fmt.Errorf("listen on %s: %w", u.raw, err))
			}
			out = append(out, boundListener{ln, u})
			// ::1 on the same port (the one picked for port 0); optional,
			// as IPv6 may be disabled.
			p := ln.Addr().(*net.TCPAddr).Port
			if ln6, err := lc.Listen(ctx, "tcp6", net.JoinHostPort("::1", strconv.Itoa(p))); err == nil {
				out = append(out, boundListener{ln6, u})
			} else {
				log.Debug("not listening on ::1", "url", u.raw, "err", err)
			}
			continue
		case u.host == "*" || u.host == "+" || u.host == "":
		case isIP(u.host):
		default:
			log.Warn("listen URL has a host name, not an IP address: listening on all interfaces (as ASP.NET Core does); give an IP address to restrict it",
				"url", u.raw)
		}
		host := ""
		if isIP(u.host) {
			host = u.host
		}
		ln, err := lc.Listen(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(u.port)))
		if err != nil {
			return fail(fmt.Errorf("listen on %s: %w", u.raw, err))
		}
		out = append(out, boundListener{ln, u})
	}
	if len(out) == 0 {
		return nil, errors.New("no listen address")
	}
	return out, nil
}
