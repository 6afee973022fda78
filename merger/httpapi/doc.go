// Package httpapi is the merger service's REST API: an http.Handler that
// speaks both API generations of the reference service (cow_merger_service)
// and drives a merger.Service.
//
// Routes (paths, query keys and form keys are matched case-insensitively,
// like ASP.NET Core; a trailing slash is ignored):
//
//	current v1 API (dnbd3-fuse since 2024, and dnbd3go's client)
//	POST /v1/File/Create                  form imageName, revision, bitfieldSize   -> 200 text/plain bare GUID
//	POST /v1/File/Update?uuid=&clusterindex=  octet-stream: bitfield + sparse blocks (or a full cluster) -> 200 empty
//	POST /v1/File/Merge                   form uuid, originalFileSize, newFileSize -> 200 text/plain "Merge started"
//	GET  /v1/File/GetTopModifiedBlocks?uuid=&amount=  -> 200 [{"clusterNumber","modifications"}], 204 when Done
//	GET  /v1/File/Status?uuid=            -> 200 {"imageName","mergedClusters","newImageVersion",
//	                                              "originalImageVersion","state","totalClusters"}
//
//	seed (2022) API
//	POST /api/File/Create                 form imageName, version, bitfieldSize
//	POST /api/File/Update?guid=&blockNumber=  octet-stream: bitfield + the full 1,310,720-byte cluster
//	POST /api/File/StartMerge             form guid, originalFileSize, newFileSize
//	GET  /api/File/GetTopModifiedBlocks?guid=&amount=  -> [{"blockNumber","modifications"}]
//	GET  /api/File/Status?guid=           -> {"imageName","mergedBlocks","newImageVersion",
//	                                              "originalImageVersion","state","totalBlocks"}
//
// Forms may be application/x-www-form-urlencoded or multipart/form-data.
// Errors: missing or unparsable parameters give 400 application/problem+json
// (a ValidationProblemDetails body); an unknown session or image 404
// text/plain; a wrong Content-Type 415; a too large body 413; a closed
// session or a revision conflict 409; an upload beyond the session's quota
// 507; back-pressure from the Service, or too many uploads at once (see
// uploads.go), 503 with Retry-After; anything else 500. Unknown routes give 404, a wrong
// method 405. With Options.Token set every request needs
// "Authorization: Bearer <token>" (else 401).
package httpapi
