// Package version reports the build's version string.
package version

import (
	"fmt"
	"runtime"
)

// These are set at link time by the Makefile:
//
//	-ldflags "-X github.com/dnbd3go/dnbd3go/internal/version.Version=... -X ...BuildDate=..."
var (
	Version   = "dev"
	BuildDate = "unknown"
)

// String is the version line daemons print and the RPC reports, in the
// reference's shape "<version>, branch <branch>, built <date>".
func String() string {
	return fmt.Sprintf("dnbd3go %s, %s, built %s", Version, runtime.Version(), BuildDate)
}
