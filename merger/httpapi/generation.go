package httpapi

import "github.com/dnbd3go/dnbd3go/merger"

// generation describes one API generation: where its routes live, what
// its parameters are called and how its replies are shaped. The two
// values, v1API and seedAPI, are read-only tables.
type generation struct {
	// name is "v1" or "api" (the seed API's route prefix), for logs.
	name string
	// prefix is the lower-case route prefix, "/v1/file/" or "/api/file/".
	prefix string
	// mergeAction is the lower-case name of the merge action.
	mergeAction string
	// Parameter names, in their canonical spelling (matched
	// case-insensitively; used as keys of validation errors).
	uuidKey, revisionKey, clusterKey string
	// fullOnly: an update body must hold the whole cluster (seed API).
	fullOnly bool
	// statusReply and topReply build the JSON replies.
	statusReply func(merger.SessionInfo) any
	topReply    func([]merger.ClusterCount) any
}
