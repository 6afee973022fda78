module github.com/dnbd3go/dnbd3go

go 1.26.8

require (
	github.com/coreos/go-systemd/v22 v22.7.0
	github.com/pojntfx/go-nbd v0.3.2
	github.com/spf13/pflag v1.0.10
	github.com/vishvananda/netlink v1.3.1
	golang.org/x/sys v0.49.0
)

require github.com/vishvananda/netns v0.0.5 // indirect
