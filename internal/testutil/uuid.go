package testutil

import "regexp"

// UUID matches a session id in the canonical lowercase 8-4-4-4-12 form.
var UUID = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// UUIDv4 matches a random (version 4, RFC 9562 variant) UUID in the
// canonical lowercase form.
var UUIDv4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
