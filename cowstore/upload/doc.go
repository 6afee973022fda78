// Package upload sends a copy-on-write session's changed clusters to a
// merger service and asks it to merge them into the image's next revision.
//
// It has three parts:
//
//   - Merger, an HTTP client for the merger's v1 REST API (create, update,
//     merge, status), byte-compatible with the requests the reference
//     dnbd3-fuse client sends.
//   - Uploader, the background loop that uploads clusters whose last change
//     is old enough while the image is attached, and the final flush (and
//     optional merge request) at detach.
//   - the session's status file, the reference's INI text rewritten
//     atomically while uploads run, including the final "done" state.
//
// The overlay is seen only through the Source interface, so everything here
// is tested against a fake overlay and the in-process merger of package
// cowstore/mergertest.
package upload
