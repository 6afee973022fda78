//go:build !linux

package main

import "errors"

// openBlockDevice is only implemented on Linux.
func openBlockDevice(path string, write bool) (blockDevice, error) {
	return nil, errors.New("block devices are only supported on Linux")
}
