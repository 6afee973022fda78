package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/dnbd3go/dnbd3go/internal/sdnotify"
)

// notifyAttached tells systemd that the device is attached and its
// partitions are scanned (READY=1; dnbd3-nbd@.service is Type=notify, so
// units ordered After= it find the device present) and keeps the STATUS=
// line current until ctx ends.
func notifyAttached(ctx context.Context, log *slog.Logger, status func() attachStatus) *sdnotify.Notifier {
	return sdnotify.Start(ctx, sdnotify.Options{Logger: log, Status: func() string { return status().line() }})
}

// line is the one-line status for systemd: "attached /dev/nbd3 via
// 10.0.0.5:5003, RTT 0.4 ms", or the failover state, plus the clusters a
// copy-on-write session has still to upload.
func (st attachStatus) line() string {
	s := "attached " + st.Device
	if st.Client.Current == "" {
		s += fmt.Sprintf(", no server: failing over for %v", st.Client.PanicFor.Round(time.Second))
	} else {
		s += fmt.Sprintf(" via %s, RTT %.1f ms", st.Client.Current, float64(st.Client.CurrentRTT)/float64(time.Millisecond))
	}
	if st.COW != nil {
		s += fmt.Sprintf(", %d clusters to upload", st.COW.DirtyClusters)
	}
	return s
}
