package client

import "errors"

// Errors returned by the client. They are wrapped with details; test for
// them with errors.Is.
var (
	// ErrImageNotFound means every server that could be reached closed the
	// connection after SELECT_IMAGE: the image or revision is unknown there.
	ErrImageNotFound = errors.New("client: image not found")
	// ErrNoServer means no server could be reached at all.
	ErrNoServer = errors.New("client: no server reachable")
	// ErrDeadline means a read stayed unanswered for Config.Deadline.
	ErrDeadline = errors.New("client: read deadline exceeded")
	// ErrClosed means the Image was closed.
	ErrClosed = errors.New("client: image closed")
	// ErrHandshake means a server's SELECT_IMAGE reply was invalid or did
	// not match the image (name, revision, size) of the first server.
	ErrHandshake = errors.New("client: bad SELECT_IMAGE reply")
	// ErrProtocol means a server sent a malformed or unexpected reply; the
	// connection is dropped and the client fails over.
	ErrProtocol = errors.New("client: protocol violation")
	// ErrServerError means a server answered a read with CMD_ERROR; the
	// read is retried on another connection.
	ErrServerError = errors.New("client: server answered with CMD_ERROR")
	// ErrStalled means the connection stopped answering.
	ErrStalled = errors.New("client: connection stalled")
)

// errClosedInHandshake means the server closed the connection before
// answering SELECT_IMAGE, which is how it says "image not found".
var errClosedInHandshake = errors.New("client: server closed the connection during SELECT_IMAGE (image or revision not available there)")
