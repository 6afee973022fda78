//go:build profile

package main

import (
	"os"
	"os/signal"
	"runtime/pprof"
	"runtime/trace"
	"syscall"
)

// A development aid, only in builds with -tags profile (go build -tags
// profile ./cmd/dnbd3-server): with DNBD3_PROFILE=PATH set, SIGTTIN starts
// a CPU profile into PATH.cpu (and, with DNBD3_TRACE set, an execution
// trace into PATH.trace), SIGTTOU stops them. Used to find where the
// server spends its time under a load (go tool pprof, go tool trace).
func init() {
	base := os.Getenv("DNBD3_PROFILE")
	if base == "" {
		return
	}
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGTTIN, syscall.SIGTTOU)
	go func() {
		var cpuF, trF *os.File
		for sig := range ch {
			if sig == syscall.SIGTTIN && cpuF == nil {
				cpuF, _ = os.Create(base + ".cpu")
				pprof.StartCPUProfile(cpuF)
				if os.Getenv("DNBD3_TRACE") != "" {
					trF, _ = os.Create(base + ".trace")
					trace.Start(trF)
				}
			} else if sig == syscall.SIGTTOU && cpuF != nil {
				pprof.StopCPUProfile()
				cpuF.Close()
				cpuF = nil
				if trF != nil {
					trace.Stop()
					trF.Close()
					trF = nil
				}
			}
		}
	}()
}
