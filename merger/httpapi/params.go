package httpapi

import (
	"errors"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"

	"github.com/dnbd3go/dnbd3go/internal/uuid"
)

// field is one name=value pair of a query string or form.
type field struct{ name, value string }

// values are the fields of a query string or form in their order.
type values []field

// get returns the first value whose name equals name, ignoring case (ASP.NET
// Core's value providers are case-insensitive and bind the first value).
func (v values) get(name string) (string, bool) {
	for _, f := range v {
		if strings.EqualFold(f.name, name) {
			return f.value, true
		}
	}
	return "", false
}

// errMalformed is returned for a query string or urlencoded form that
// cannot be decoded.
var errMalformed = errors.New("httpapi: malformed percent-encoding")

// parseURLEncoded decodes a query string or an urlencoded form body,
// keeping the order of the fields ("+" is a space, "&" separates fields).
func parseURLEncoded(s string) (values, error) {
	var out values
	for s != "" {
		var pair string
		pair, s, _ = strings.Cut(s, "&")
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		name, err1 := url.QueryUnescape(k)
		value, err2 := url.QueryUnescape(v)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%w in %q", errMalformed, pair)
		}
		out = append(out, field{name, value})
	}
	return out, nil
}

// binder reads the parameters of one request from one source (the query
// or the form) and collects the validation errors of all of them, like
// ASP.NET Core's model binding with [ApiController].
type binder struct {
	src  values
	errs map[string][]string
}

// fail records a validation error for parameter name.
func (b *binder) fail(name, msg string) {
	if b.errs == nil {
		b.errs = make(map[string][]string)
	}
	b.errs[name] = append(b.errs[name], msg)
}

// raw returns the trimmed value of a required parameter, recording an
// error if it is missing or empty.
func (b *binder) raw(name string) (string, bool) {
	v, ok := b.src.get(name)
	v = strings.TrimSpace(v)
	if !ok || v == "" {
		b.fail(name, fmt.Sprintf("The %s field is required.", name))
		return "", false
	}
	return v, true
}

// str returns a required string parameter (not trimmed; empty counts as
// missing).
func (b *binder) str(name string) string {
	v, ok := b.src.get(name)
	if !ok || strings.TrimSpace(v) == "" {
		b.fail(name, fmt.Sprintf("The %s field is required.", name))
		return ""
	}
	return v
}

// integer returns a required integer parameter in [lo, hi].
func (b *binder) integer(name string, lo, hi int64) int64 {
	v, ok := b.raw(name)
	if !ok {
		return 0
	}
	bitSize := 64
	if hi <= math.MaxInt32 {
		bitSize = 32 // an int parameter: a value over int32 does not parse
	}
	n, err := strconv.ParseInt(v, 10, bitSize)
	if err != nil {
		b.fail(name, fmt.Sprintf("The value '%s' is not valid for %s.", clip(v), name))
		return 0
	}
	if n < lo || n > hi {
		b.fail(name, fmt.Sprintf("The field %s must be between %d and %d.", name, lo, hi))
		return 0
	}
	return n
}

// int32 returns a required int32 parameter that is at least lo.
func (b *binder) int32(name string, lo int64) int {
	return int(b.integer(name, lo, math.MaxInt32))
}

// int64 returns a required int64 parameter that is at least lo.
func (b *binder) int64(name string, lo int64) int64 {
	return b.integer(name, lo, math.MaxInt64)
}

// guid returns a required GUID parameter in its canonical form
// (lower-case 8-4-4-4-12; the other .NET formats are accepted, see
// uuid.Parse).
func (b *binder) guid(name string) string {
	v, ok := b.raw(name)
	if !ok {
		return ""
	}
	g, ok := uuid.Parse(v)
	if !ok {
		b.fail(name, fmt.Sprintf("The value '%s' is not valid for %s.", clip(v), name))
		return ""
	}
	return g
}

// err returns the collected validation errors, or nil.
func (b *binder) err() error {
	if len(b.errs) == 0 {
		return nil
	}
	return &validationError{errors: b.errs}
}

// clip shortens a value quoted in an error message.
func clip(s string) string {
	const n = 64
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
