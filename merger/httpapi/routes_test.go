package httpapi

import (
	"net/http"
	"testing"

	"github.com/dnbd3go/dnbd3go/internal/testutil"
	"github.com/dnbd3go/dnbd3go/merger"
)

func TestCreateV1URLEncoded(t *testing.T) {
	f, srv := start(t, Options{})
	// Exactly what dnbd3-fuse sends (cow-format.md §13), the name
	// percent-encoded as curl_easy_escape does.
	r := post(t, srv, "/v1/file/create", "revision=1&bitfieldSize=40&imageName=pool%2Fwin%2010")
	r.want(t, 200, "text/plain; charset=utf-8", "*")
	if !testutil.UUID.MatchString(r.body) || len(r.body) != 36 {
		t.Fatalf("create reply %q is not a bare 36-character GUID", r.body)
	}
	if got := r.header.Get("Content-Length"); got != "36" {
		t.Errorf("Content-Length %q, want 36", got)
	}
	if len(f.creates) != 1 || f.creates[0] != (createCall{"pool/win 10", 1, 40}) {
		t.Fatalf("creates = %+v", f.creates)
	}
	if _, ok := f.sessions[r.body]; !ok {
		t.Errorf("reply %q is not the session the service created", r.body)
	}
}

func TestCreateMultipart(t *testing.T) {
	f, srv := start(t, Options{})
	// The 2022 client sent multipart/form-data with version=.
	ct, body := multipartForm(t, "imageName", "test", "version", "7", "bitfieldSize", "40")
	send(t, srv, "POST", "/api/File/Create", ct, body).want(t, 200, "text/plain; charset=utf-8", "*")
	// v1 accepts multipart as well.
	ct, body = multipartForm(t, "IMAGENAME", "other", "Revision", "3", "bitfieldsize", "40")
	send(t, srv, "POST", "/v1/File/Create", ct, body).want(t, 200, "text/plain; charset=utf-8", "*")
	// And the seed API urlencoded.
	post(t, srv, "/api/file/create", "imageName=x&version=2&bitfieldSize=40").want(t, 200, "text/plain; charset=utf-8", "*")
	want := []createCall{{"test", 7, 40}, {"other", 3, 40}, {"x", 2, 40}}
	if len(f.creates) != 3 || f.creates[0] != want[0] || f.creates[1] != want[1] || f.creates[2] != want[2] {
		t.Fatalf("creates = %+v, want %+v", f.creates, want)
	}
}

func TestCreateParameterLocationAndValidation(t *testing.T) {
	f, srv := start(t, Options{})
	// Form parameters in the query string do not count.
	send(t, srv, "POST", "/v1/file/create?revision=1&bitfieldSize=40&imageName=x", formType, []byte{}).
		wantProblem(t, "bitfieldSize", "imageName", "revision")
	// The seed API wants version=, not revision=.
	post(t, srv, "/api/File/Create", "revision=1&bitfieldSize=40&imageName=x").wantProblem(t, "version")
	post(t, srv, "/v1/File/Create", "revision=x1&bitfieldSize=40&imageName=x").wantProblem(t, "revision")
	post(t, srv, "/v1/File/Create", "revision=2147483648&bitfieldSize=40&imageName=x").wantProblem(t, "revision")
	post(t, srv, "/v1/File/Create", "revision=1&bitfieldSize=-1&imageName=").wantProblem(t, "bitfieldSize", "imageName")
	// No body and no Content-Type: every parameter is missing.
	send(t, srv, "POST", "/v1/File/Create", "", nil).wantProblem(t, "bitfieldSize", "imageName", "revision")
	if len(f.creates) != 0 {
		t.Fatalf("service called for invalid requests: %+v", f.creates)
	}
	// A form of the wrong media type: 415.
	send(t, srv, "POST", "/v1/File/Create", "application/json", []byte(`{"imageName":"x"}`)).
		want(t, 415, "text/plain; charset=utf-8", "*")
	// Malformed percent-encoding: 400 text.
	post(t, srv, "/v1/File/Create", "revision=1&bitfieldSize=40&imageName=%zz").want(t, 400, "text/plain; charset=utf-8", "*")
	// Surrounding spaces and a plus sign are fine for integers, the first
	// of repeated keys wins (whatever its case).
	post(t, srv, "/v1/File/Create", "revision=+4&bitfieldSize=%2040%20&imageName=a+b&IMAGENAME=c").
		want(t, 200, "text/plain; charset=utf-8", "*")
	if len(f.creates) != 1 || f.creates[0] != (createCall{"a b", 4, 40}) {
		t.Fatalf("creates = %+v", f.creates)
	}
}

func TestCaseInsensitiveRoutes(t *testing.T) {
	f, srv := start(t, Options{})
	id := post(t, srv, "/V1/FILE/CREATE", "IMAGENAME=x&REVISION=1&BITFIELDSIZE=40").body
	if !testutil.UUID.MatchString(id) {
		t.Fatalf("create: %q", id)
	}
	bf, blocks := sparseBody(5)
	body := append(bf[:], blocks...)
	for i, path := range []string{
		"/v1/file/update?uuid=" + id + "&clusterindex=1",
		"/V1/File/Update?UUID=" + id + "&ClusterIndex=2",
		"/v1/FILE/update/?Uuid=" + id + "&CLUSTERINDEX=3",
		// .NET's other GUID formats, upper case: the Service gets the canonical form.
		"/v1/file/update?uuid=%7B" + upper(id) + "%7D&clusterindex=4",
		"/v1/file/update?uuid=" + stripDashes(id) + "&clusterindex=5",
	} {
		send(t, srv, "POST", path, "application/octet-stream", body).want(t, 200, "*", "")
		u, _ := f.lastUpdate()
		if u.uuid != id || u.u.Cluster != i+1 {
			t.Errorf("%s: update %s cluster %d", path, u.uuid, u.u.Cluster)
		}
	}
	get(t, srv, "/V1/FILE/STATUS?UUID="+id).want(t, 200, "application/json; charset=utf-8", "*")
	get(t, srv, "/v1/file/gettopmodifiedblocks?UUID="+id+"&AMOUNT=2").want(t, 200, "application/json; charset=utf-8", "*")
	post(t, srv, "/API/file/STARTMERGE", "GUID="+id+"&OriginalFileSize=1&NEWFILESIZE=2").want(t, 200, "*", "Merge started")
	if len(f.merges) != 1 || f.merges[0] != (mergeCall{id, 1, 2}) {
		t.Fatalf("merges = %+v", f.merges)
	}
}

func upper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'a' <= c && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
	}
	return string(b)
}

func stripDashes(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		if s[i] != '-' {
			b = append(b, s[i])
		}
	}
	return string(b)
}

func TestUnknownRoutesAndMethods(t *testing.T) {
	f, srv := start(t, Options{})
	for _, path := range []string{"/", "/v1", "/v1/file", "/v1/file/", "/v2/file/create", "/v1/file/delete", "/api/file/merge", "/v1/file/startmerge", "/swagger/index.html", "/v1/file/create/x"} {
		post(t, srv, path, "imageName=x&revision=1&bitfieldSize=40").want(t, 404, "text/plain; charset=utf-8", "Not found")
	}
	for _, c := range []struct{ method, path, allow string }{
		{"GET", "/v1/file/create", "POST"},
		{"PUT", "/v1/file/update", "POST"},
		{"GET", "/v1/file/merge", "POST"},
		{"GET", "/api/file/startmerge", "POST"},
		{"POST", "/v1/file/status", "GET"},
		{"DELETE", "/api/file/gettopmodifiedblocks", "GET"},
		{"HEAD", "/v1/file/status", "GET"},
	} {
		r := send(t, srv, c.method, c.path, "", nil)
		if r.status != http.StatusMethodNotAllowed || r.header.Get("Allow") != c.allow {
			t.Errorf("%s %s: %d Allow=%q, want 405 Allow=%s", c.method, c.path, r.status, r.header.Get("Allow"), c.allow)
		}
	}
	if n := f.callCount(); n != 0 {
		t.Errorf("service called %d times", n)
	}
}

func TestMergeRepliesAndValidation(t *testing.T) {
	f, srv := start(t, Options{})
	id := f.addSession("img", 4, merger.StateActive)
	// The dnbd3-fuse body (cow-format.md §13).
	post(t, srv, "/v1/file/merge", "originalFileSize=8380000&newFileSize=8388608&uuid="+id).
		want(t, 200, "text/plain; charset=utf-8", "Merge started")
	// The client's retries.
	post(t, srv, "/v1/file/merge", "originalFileSize=8380000&newFileSize=8388608&uuid="+id).
		want(t, 200, "text/plain; charset=utf-8", "Merge in progress")
	f.setState(id, merger.StateDone, "")
	post(t, srv, "/v1/file/merge", "originalFileSize=8380000&newFileSize=8388608&uuid="+id).
		want(t, 200, "text/plain; charset=utf-8", "Merge done")
	f.setState(id, merger.StateFailed, "disk full")
	post(t, srv, "/v1/file/merge", "originalFileSize=8380000&newFileSize=8388608&uuid="+id).
		want(t, 409, "text/plain; charset=utf-8", "Merge failed: disk full")
	if len(f.merges) != 4 || f.merges[0] != (mergeCall{id, 8380000, 8388608}) {
		t.Fatalf("merges = %+v", f.merges)
	}
	ct, body := multipartForm(t, "guid", id, "originalFileSize", "1", "newFileSize", "2")
	send(t, srv, "POST", "/api/File/StartMerge", ct, body).want(t, 409, "*", "*")
	if m := f.merges[len(f.merges)-1]; m != (mergeCall{id, 1, 2}) {
		t.Fatalf("seed merge = %+v", m)
	}

	n := len(f.merges)
	post(t, srv, "/v1/file/merge", "originalFileSize=-1&newFileSize=9223372036854775808&uuid=nope").
		wantProblem(t, "newFileSize", "originalFileSize", "uuid")
	post(t, srv, "/v1/file/merge", "originalFileSize=1&newFileSize=2&guid="+id).wantProblem(t, "uuid")
	post(t, srv, "/api/file/startmerge", "originalFileSize=1&newFileSize=2&uuid="+id).wantProblem(t, "guid")
	// Parameters in the query instead of the form.
	send(t, srv, "POST", "/v1/file/merge?originalFileSize=1&newFileSize=2&uuid="+id, formType, []byte{}).
		wantProblem(t, "newFileSize", "originalFileSize", "uuid")
	if len(f.merges) != n {
		t.Errorf("service called for invalid merges")
	}
	post(t, srv, "/v1/file/merge", "originalFileSize=1&newFileSize=2&uuid=00000000-0000-0000-0000-000000000000").
		want(t, 404, "text/plain; charset=utf-8", "Session not found")
}
