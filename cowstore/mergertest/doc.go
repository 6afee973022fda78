// Package mergertest runs an in-process fake merger service for tests,
// like net/http/httptest does for HTTP servers.
//
// The fake speaks the merger's v1 REST API on 127.0.0.1 (routes, query and
// form keys matched case-insensitively, as ASP.NET Core does):
//
//	POST /v1/file/create  form revision, bitfieldSize (must be 40), imageName
//	                      -> 200, a bare 36-character GUID (no quotes, no newline)
//	POST /v1/file/update  ?uuid=&clusterindex=, Content-Type application/octet-stream,
//	                      body = 40-byte bitfield + 4096 bytes per set bit
//	                      -> 200; the newest upload of a cluster replaces the older one
//	POST /v1/file/merge   form uuid, originalFileSize, newFileSize -> 200 "Merge started"
//	GET  /v1/file/status  ?uuid= -> JSON {imageName, mergedClusters, ...}
//
// It is stricter than the reference service where the reference is buggy:
// an update body must be exactly 40 + 4096 x popcount bytes (else 400) and
// replaces the stored bitfield instead of ORing it. Every request is
// recorded for assertions, faults (error statuses, 503 with or without
// Retry-After, latency) can be injected, and MergedImage computes the image
// a correct merge produces.
package mergertest
