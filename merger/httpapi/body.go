package httpapi

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strconv"

	"github.com/dnbd3go/dnbd3go/cowformat"
)

// Request body limits.
const (
	// MaxFormBytes is the largest form body (create, merge) accepted.
	MaxFormBytes = 64 << 10
	// MaxUpdateBytes is the largest update body accepted: the bitfield and
	// a full cluster.
	MaxUpdateBytes = cowformat.BitfieldSize + cowformat.ClusterSize
)

// Media types.
const (
	typeURLEncoded  = "application/x-www-form-urlencoded"
	typeMultipart   = "multipart/form-data"
	typeOctetStream = "application/octet-stream"
	typeText        = "text/plain; charset=utf-8"
	typeJSON        = "application/json; charset=utf-8"
	typeProblem     = "application/problem+json; charset=utf-8"
)

// trackingReader remembers the first error other than io.EOF its reader
// returned, so that a body limit is recognised even when a parser wraps
// the error without %w.
type trackingReader struct {
	r   io.Reader
	err error
}

func (t *trackingReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF && t.err == nil {
		t.err = err
	}
	return n, err
}

// bodyError turns a failed body read into the error to answer with: the
// body limit (413) or an incomplete body (400).
func bodyError(t *trackingReader, err error) error {
	var tooBig *http.MaxBytesError
	if errors.As(t.err, &tooBig) || errors.As(err, &tooBig) {
		return tooBig
	}
	return &httpError{status: http.StatusBadRequest, msg: "cannot read the request body: " + err.Error()}
}

// tooLarge is the 413 error for a body that announces more than limit bytes.
func tooLarge(limit int64) error { return &http.MaxBytesError{Limit: limit} }

// mediaType returns the request's media type ("" if there is no
// Content-Type) or a 415 error if the header cannot be parsed.
func mediaType(r *http.Request) (string, map[string]string, error) {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return "", nil, nil
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return "", nil, &httpError{status: http.StatusUnsupportedMediaType, msg: fmt.Sprintf("unparsable Content-Type %q", clip(ct))}
	}
	return mt, params, nil
}

// readForm reads an urlencoded or multipart form body of at most
// MaxFormBytes. A request without Content-Type and without a body is an
// empty form (its parameters are then missing, 400); any other media type
// is 415.
func readForm(w http.ResponseWriter, r *http.Request) (values, error) {
	mt, params, err := mediaType(r)
	if err != nil {
		return nil, err
	}
	if mt == "" && r.ContentLength == 0 {
		return nil, nil
	}
	if mt != typeURLEncoded && mt != typeMultipart {
		return nil, &httpError{status: http.StatusUnsupportedMediaType,
			msg: "Content-Type must be " + typeURLEncoded + " or " + typeMultipart}
	}
	if r.ContentLength > MaxFormBytes {
		return nil, tooLarge(MaxFormBytes)
	}
	body := &trackingReader{r: http.MaxBytesReader(w, r.Body, MaxFormBytes)}
	if mt == typeURLEncoded {
		b, err := io.ReadAll(body)
		if err != nil {
			return nil, bodyError(body, err)
		}
		v, err := parseURLEncoded(string(b))
		if err != nil {
			return nil, &httpError{status: http.StatusBadRequest, msg: "form: " + err.Error()}
		}
		return v, nil
	}
	boundary := params["boundary"]
	if boundary == "" {
		return nil, &httpError{status: http.StatusBadRequest, msg: "multipart form without boundary"}
	}
	return readMultipart(multipart.NewReader(body, boundary), body)
}

// readMultipart collects the value parts of a multipart form; file parts
// are skipped (no parameter binds to a file).
func readMultipart(mr *multipart.Reader, body *trackingReader) (values, error) {
	var out values
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			if body.err != nil {
				return nil, bodyError(body, err)
			}
			return nil, &httpError{status: http.StatusBadRequest, msg: "malformed multipart form: " + err.Error()}
		}
		name := part.FormName()
		b, err := io.ReadAll(part)
		if err != nil {
			if body.err != nil {
				return nil, bodyError(body, err)
			}
			return nil, &httpError{status: http.StatusBadRequest, msg: "malformed multipart form: " + err.Error()}
		}
		if name != "" && part.FileName() == "" {
			out = append(out, field{name, string(b)})
		}
	}
}

// checkOctetStream answers 415 unless the request is
// application/octet-stream (as the reference's [Consumes] does), and 413
// if it announces more than MaxUpdateBytes.
func checkOctetStream(r *http.Request) error {
	mt, _, err := mediaType(r)
	if err != nil {
		return err
	}
	if mt != typeOctetStream {
		return &httpError{status: http.StatusUnsupportedMediaType, msg: "Content-Type must be " + typeOctetStream}
	}
	if r.ContentLength > MaxUpdateBytes {
		return tooLarge(MaxUpdateBytes)
	}
	return nil
}

// readUpdateBody reads an update body of at most MaxUpdateBytes (with or
// without Content-Length) into buf, which holds MaxUpdateBytes, and
// returns the part of buf it filled.
func readUpdateBody(w http.ResponseWriter, r *http.Request, buf []byte) ([]byte, error) {
	body := &trackingReader{r: http.MaxBytesReader(w, r.Body, MaxUpdateBytes)}
	if r.ContentLength >= 0 {
		p := buf[:r.ContentLength] // checkOctetStream bounded it
		if _, err := io.ReadFull(body, p); err != nil {
			return nil, bodyError(body, fmt.Errorf("%w after fewer than the announced %s bytes", err, strconv.FormatInt(r.ContentLength, 10)))
		}
		return p, nil
	}
	n, err := io.ReadFull(body, buf[:MaxUpdateBytes])
	switch err {
	case io.EOF, io.ErrUnexpectedEOF:
		return buf[:n], nil
	case nil: // full: anything more is over the limit
		var one [1]byte
		switch _, err := io.ReadFull(body, one[:]); err {
		case io.EOF:
			return buf[:n], nil
		case nil:
			err = tooLarge(MaxUpdateBytes)
			fallthrough
		default:
			return nil, bodyError(body, err)
		}
	}
	return nil, bodyError(body, err)
}
