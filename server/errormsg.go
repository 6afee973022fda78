package server

import (
	"context"
	"net"
	"strconv"
	"sync"
	"time"
)

// ServeErrorMessage answers every connection on ln with an HTTP response
// `200 Somewhat OK` carrying {"errorMsg": msg} and closes it, until ctx is
// done (the reference's --errormsg mode for a server taken out of service).
func ServeErrorMessage(ctx context.Context, ln net.Listener, msg string) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	o := newJSONObject()
	o.str("errorMsg", msg)
	body := o.bytes()
	resp := []byte("HTTP/1.1 200 Somewhat OK\r\nConnection: Close\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + string(body))
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 512)
			c.Read(buf)
			c.Write(resp)
		}()
	}
}
