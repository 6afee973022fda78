// Package e2e holds end-to-end tests that need no root: dnbd3-server and
// the client library in one process, and the built binaries driven as an
// administrator would drive them.
package e2e
