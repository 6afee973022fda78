package mergertest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnbd3go/dnbd3go/cowformat"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

func post(t *testing.T, url, ct string, body []byte) (int, string) {
	t.Helper()
	resp, err := http.Post(url, ct, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

const formCT = "application/x-www-form-urlencoded"

func create(t *testing.T, s *Server, name string) string {
	t.Helper()
	code, id := post(t, s.URL+"/v1/file/create", formCT, []byte("revision=1&bitfieldSize=40&imageName="+name))
	if code != 200 {
		t.Fatalf("create: %d %q", code, id)
	}
	return id
}

// body builds an update body with the given bits set; block k holds byte
// fill+k.
func body(fill byte, bitsSet ...int) []byte {
	var bf [cowformat.BitfieldSize]byte
	for _, b := range bitsSet {
		bf[b/8] |= 1 << (b % 8)
	}
	out := append([]byte(nil), bf[:]...)
	for k := range bitsSet {
		out = append(out, bytes.Repeat([]byte{fill + byte(k)}, cowformat.BlockSize)...)
	}
	return out
}

func update(t *testing.T, s *Server, id string, idx int, b []byte) (int, string) {
	t.Helper()
	return post(t, fmt.Sprintf("%s/v1/file/update?uuid=%s&clusterindex=%d", s.URL, id, idx), "application/octet-stream", b)
}

func TestCreateReplyAndRecord(t *testing.T) {
	s := Start(t)
	resp, err := http.Post(s.URL+"/V1/File/Create", formCT, strings.NewReader("Revision=7&BITFIELDSIZE=40&imagename=a%20b%2Fc"))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !testutil.UUIDv4.Match(raw) || len(raw) != 36 {
		t.Fatalf("create reply %d %q, want a bare GUID", resp.StatusCode, raw)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; charset=utf-8" {
		t.Errorf("content type %q", ct)
	}
	sess, ok := s.Session(string(raw))
	if !ok || sess.ImageName != "a b/c" || sess.Revision != 7 || sess.BitfieldSize != 40 {
		t.Fatalf("session %+v %v", sess, ok)
	}
	reqs := s.RequestsTo("create")
	if len(reqs) != 1 || reqs[0].Method != "POST" || reqs[0].Path != "/V1/File/Create" ||
		string(reqs[0].Body) != "Revision=7&BITFIELDSIZE=40&imagename=a%20b%2Fc" || reqs[0].ContentType != formCT || reqs[0].Status != 200 {
		t.Fatalf("recorded %+v", reqs)
	}
}

func TestCreateMultipartAndBadForms(t *testing.T) {
	s := Start(t)
	var buf bytes.Buffer
	buf.WriteString("--XX\r\nContent-Disposition: form-data; name=\"imageName\"\r\n\r\nimg\r\n" +
		"--XX\r\nContent-Disposition: form-data; name=\"revision\"\r\n\r\n2\r\n" +
		"--XX\r\nContent-Disposition: form-data; name=\"bitfieldSize\"\r\n\r\n40\r\n--XX--\r\n")
	if code, id := post(t, s.URL+"/v1/file/create", "multipart/form-data; boundary=XX", buf.Bytes()); code != 200 || !testutil.UUIDv4.MatchString(id) {
		t.Fatalf("multipart create: %d %q", code, id)
	}
	for _, tc := range []struct {
		ct, body string
		want     int
	}{
		{formCT, "revision=1&bitfieldSize=320&imageName=x", 400},
		{formCT, "revision=1&bitfieldSize=40", 400},
		{formCT, "revision=x&bitfieldSize=40&imageName=x", 400},
		{"text/plain", "revision=1&bitfieldSize=40&imageName=x", 415},
	} {
		if code, msg := post(t, s.URL+"/v1/file/create", tc.ct, []byte(tc.body)); code != tc.want {
			t.Errorf("%s %q: %d %q, want %d", tc.ct, tc.body, code, msg, tc.want)
		}
	}
	s.NextUUIDs("c0ffee00-5e71-4d3b-9a0c-000000000001")
	if id := create(t, s, "x"); id != "c0ffee00-5e71-4d3b-9a0c-000000000001" {
		t.Fatalf("NextUUIDs: got %q", id)
	}
	if len(s.Sessions()) != 2 {
		t.Fatalf("sessions %v", s.Sessions())
	}
}

func TestUpdateValidationAndReplace(t *testing.T) {
	s := Start(t)
	id := create(t, s, "img")

	if code, _ := post(t, s.URL+"/v1/file/update?uuid="+id+"&clusterindex=3", "application/x-www-form-urlencoded", body(1, 0)); code != 415 {
		t.Errorf("wrong content type: %d", code)
	}
	short := body(1, 0, 5)[:40+4096]
	if code, _ := update(t, s, id, 3, short); code != 400 {
		t.Errorf("short body: %d", code)
	}
	full := append(body(1, 0), make([]byte, 319*4096)...)
	if code, _ := update(t, s, id, 3, full); code != 400 {
		t.Errorf("full-cluster body with one bit: %d", code)
	}
	if code, _ := update(t, s, id, 3, []byte("abc")); code != 400 {
		t.Errorf("tiny body: %d", code)
	}
	if code, _ := update(t, s, "00000000-0000-0000-0000-000000000000", 3, body(1, 0)); code != 404 {
		t.Errorf("unknown session: %d", code)
	}
	if code, _ := update(t, s, id, -1, body(1, 0)); code != 400 {
		t.Errorf("negative index: %d", code)
	}
	if code, _ := update(t, s, id, 1<<31, body(1, 0)); code != 400 {
		t.Errorf("index over int32: %d", code)
	}

	if code, msg := update(t, s, id, 3, body(0x10, 0, 1, 319)); code != 200 || msg != "" {
		t.Fatalf("update: %d %q", code, msg)
	}
	// A later upload with fewer bits replaces the earlier one.
	if code, _ := post(t, s.URL+"/V1/FILE/UPDATE?UUID="+id+"&ClusterIndex=3", "application/octet-stream", body(0x20, 1)); code != 200 {
		t.Fatalf("second update: %d", code)
	}
	// An empty bitfield is a valid upload too.
	if code, _ := update(t, s, id, 9, body(0)); code != 200 {
		t.Fatalf("empty update: %d", code)
	}
	sess, _ := s.Session(id)
	c := sess.Clusters[3]
	if sess.Updates != 3 || c.Uploads != 2 || c.Bitfield != [40]byte{0: 2} || !bytes.Equal(c.Blocks, bytes.Repeat([]byte{0x20}, 4096)) {
		t.Fatalf("stored cluster %+v (updates %d)", c.Bitfield, sess.Updates)
	}
	if len(sess.Clusters) != 2 {
		t.Fatalf("clusters %d", len(sess.Clusters))
	}
}

func TestMergeStatusAndMergedImage(t *testing.T) {
	s := Start(t)
	id := create(t, s, "img")
	orig := make([]byte, 3*cowformat.ClusterSize)
	for i := range orig {
		orig[i] = byte(i % 251)
	}
	update(t, s, id, 0, body(0xA0, 0, 2))
	update(t, s, id, 2, body(0xB0, 319))
	update(t, s, id, 4, body(0xC0, 1)) // past the new end of the original

	resp, err := http.Get(s.URL + "/v1/file/status?uuid=" + id)
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if st["state"] != "Active" || st["totalClusters"] != float64(3) || st["imageName"] != "img" || st["newImageVersion"] != float64(-1) {
		t.Fatalf("status %v", st)
	}

	if _, err := s.MergedImage(orig, id); err == nil {
		t.Fatal("MergedImage before a merge succeeded")
	}
	validRemote := int64(cowformat.ClusterSize + 1000) // the original was cut inside cluster 1
	newSize := int64(4*cowformat.ClusterSize + 3*cowformat.BlockSize)
	if code, msg := post(t, s.URL+"/v1/file/merge", formCT, fmt.Appendf(nil, "originalFileSize=%d&newFileSize=%d&uuid=%s", validRemote, newSize, id)); code != 200 || msg != "Merge started" {
		t.Fatalf("merge: %d %q", code, msg)
	}
	if code, _ := update(t, s, id, 0, body(1, 0)); code != 409 {
		t.Errorf("update after merge: %d", code)
	}
	got, err := s.MergedImage(orig, id)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, newSize)
	copy(want, orig[:validRemote])
	fill := func(off int64, b byte) {
		copy(want[off:off+cowformat.BlockSize], bytes.Repeat([]byte{b}, cowformat.BlockSize))
	}
	fill(0, 0xA0)
	fill(2*cowformat.BlockSize, 0xA1)
	fill(2*cowformat.ClusterSize+319*cowformat.BlockSize, 0xB0)
	fill(4*cowformat.ClusterSize+cowformat.BlockSize, 0xC0)
	if !bytes.Equal(got, want) {
		t.Fatal("merged image differs from the hand-built one")
	}
	sess, _ := s.Session(id)
	if len(sess.Merges) != 1 || sess.Merges[0].OriginalFileSize != validRemote || sess.Merges[0].NewFileSize != newSize {
		t.Fatalf("merges %+v", sess.Merges)
	}
}

func TestFaultsLatencyToken(t *testing.T) {
	s := Start(t)
	id := create(t, s, "img")
	s.FailUpdate(Fault{Status: 503, RetryAfter: "7", Times: 2})
	s.FailUpdate(Fault{Status: 500, Body: "boom", Times: 1})
	for i, want := range []int{503, 503, 500, 200} {
		resp, err := http.Post(fmt.Sprintf("%s/v1/file/update?uuid=%s&clusterindex=1", s.URL, id), "application/octet-stream", bytes.NewReader(body(1, 0)))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("request %d: %d, want %d", i, resp.StatusCode, want)
		}
		if ra := resp.Header.Get("Retry-After"); (want == 503) != (ra == "7") {
			t.Errorf("request %d: Retry-After %q", i, ra)
		}
		if want == 500 && string(b) != "boom" {
			t.Errorf("fault body %q", b)
		}
	}
	if sess, _ := s.Session(id); sess.Updates != 1 {
		t.Fatalf("faulted updates were stored: %d", sess.Updates)
	}
	s.FailCreate(Fault{Status: 404, Body: "Image not found"})
	for range 2 {
		if code, msg := post(t, s.URL+"/v1/file/create", formCT, []byte("revision=1&bitfieldSize=40&imageName=x")); code != 404 || msg != "Image not found" {
			t.Fatalf("refused create: %d %q", code, msg)
		}
	}
	s.ClearFaults()
	create(t, s, "x")

	s.RequireToken("sekrit")
	if code, _ := post(t, s.URL+"/v1/file/create", formCT, []byte("revision=1&bitfieldSize=40&imageName=x")); code != 401 {
		t.Fatalf("no token: %d", code)
	}
	req, _ := http.NewRequest("POST", s.URL+"/v1/file/create", strings.NewReader("revision=1&bitfieldSize=40&imageName=x"))
	req.Header.Set("Content-Type", formCT)
	req.Header.Set("Authorization", "Bearer sekrit")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("with token: %d", resp.StatusCode)
	}
}

func TestConcurrencyCount(t *testing.T) {
	s := Start(t)
	id := create(t, s, "img")
	s.SetLatency(100e6)
	done := make(chan struct{})
	for i := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			resp, err := http.Post(fmt.Sprintf("%s/v1/file/update?uuid=%s&clusterindex=%d", s.URL, id, i), "application/octet-stream", bytes.NewReader(body(1, 0)))
			if err == nil {
				resp.Body.Close()
			}
		}()
	}
	for range 4 {
		<-done
	}
	if got := s.MaxConcurrentUpdates(); got != 4 {
		t.Fatalf("max concurrent updates %d, want 4", got)
	}
	s.ResetConcurrency()
	if s.MaxConcurrentUpdates() != 0 {
		t.Fatal("reset")
	}
}

// TestReferenceFixtureMerge replays the exact update bodies the reference
// client sent (testdata/cow-session-v3) and checks that the merged image
// is the expected one.
func TestReferenceFixtureMerge(t *testing.T) {
	dir := testutil.Testdata(t, "cow-session-v3")
	s := Start(t)
	s.NextUUIDs("c0ffee00-5e71-4d3b-9a0c-000000000001")
	id := create(t, s, "cowsrc")
	for _, c := range []int{0, 1, 6} {
		b, err := os.ReadFile(filepath.Join(dir, "merger-uploads", fmt.Sprintf("cluster-%d.bin", c)))
		if err != nil {
			t.Fatal(err)
		}
		if code, msg := update(t, s, id, c, b); code != 200 {
			t.Fatalf("cluster %d: %d %q", c, code, msg)
		}
	}
	if code, _ := post(t, s.URL+"/v1/file/merge", formCT, []byte("originalFileSize=8388608&newFileSize=9000000&uuid="+id)); code != 200 {
		t.Fatal("merge")
	}
	img, err := s.MergedImage(testutil.GenImage(0, 8388608), id)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(img)
	if got := hex.EncodeToString(sum[:]); got != "0ae40f3a85d4dc81623b8c54823488f8eab80f137b26f4cc1ab72ba950f6d7b9" {
		t.Fatalf("merged image sha256 %s (len %d)", got, len(img))
	}
}

func TestTLS(t *testing.T) {
	s := NewTLS()
	defer s.Close()
	if !strings.HasPrefix(s.URL, "https://127.0.0.1:") || s.Certificate() == nil {
		t.Fatalf("URL %s", s.URL)
	}
	resp, err := s.Client().Post(s.URL+"/v1/file/create", formCT, strings.NewReader("revision=1&bitfieldSize=40&imageName=x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
}
