package cowstore

import "github.com/dnbd3go/dnbd3go/cowstore/upload"

// The overlay is what the uploader reads from (checked here, so the
// package itself does not import its uploader).
var _ upload.Source = (*Overlay)(nil)
