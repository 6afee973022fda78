// Package kernel holds integration tests that need root and the kernel's
// NBD driver (/dev/nbd*). They run inside a throw-away VM:
//
//	tests/integration/vm/vmtest.sh -p ./tests/integration/kernel/
//
// (make test-integration). Elsewhere every test skips: the tests unload
// and reload the nbd module and attach devices, which a developer's
// machine must not suffer.
package kernel
