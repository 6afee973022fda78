package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/dnbd3go/dnbd3go/internal/promtest"
	"github.com/dnbd3go/dnbd3go/internal/testutil"
)

// startMergerToken runs dnbd3-merger with a token and returns its
// host:port.
func startMergerToken(t *testing.T, base, token string) string {
	t.Helper()
	tokFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokFile, []byte(token+"\n"), 0o600)
	return startMerger(t, base, "--token-file", tokFile)
}

// mergerClient drives the merger's v1 API with a token.
type mergerClient struct {
	t     *testing.T
	base  string
	token string
}

func (c *mergerClient) do(method, path, ctype string, body []byte) (int, string) {
	c.t.Helper()
	req, _ := http.NewRequest(method, c.base+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+c.token)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// session creates a session on name r1 and uploads clusters 0..n-1 with
// two 4 KiB blocks each; it returns the UUID and the bytes uploaded.
func (c *mergerClient) session(name string, n int) (string, int) {
	c.t.Helper()
	code, id := c.do("POST", "/v1/file/create", "application/x-www-form-urlencoded",
		[]byte(url.Values{"imageName": {name}, "revision": {"1"}, "bitfieldSize": {"40"}}.Encode()))
	if code != 200 {
		c.t.Fatalf("create: %d %s", code, id)
	}
	body := make([]byte, 40+2*4096)
	body[0] = 0x03 // blocks 0 and 1
	for i := 40; i < len(body); i++ {
		body[i] = byte(i)
	}
	for cl := range n {
		if code, msg := c.do("POST", fmt.Sprintf("/v1/file/update?uuid=%s&clusterindex=%d", id, cl), "application/octet-stream", body); code != 200 {
			c.t.Fatalf("update %d: %d %s", cl, code, msg)
		}
	}
	return id, n * len(body)
}

func (c *mergerClient) state(id string) string {
	c.t.Helper()
	_, body := c.do("GET", "/v1/file/status?uuid="+id, "", nil)
	var v map[string]any
	json.Unmarshal([]byte(body), &v)
	s, _ := v["state"].(string)
	return s
}

// TestMergerMetricsAndStatusPage uploads to two sessions, merges one,
// checks the scrape (promtool, asserted values) and loads the status page
// in chromium with the token: both sessions with their state, clusters and
// progress, a clean console and a screenshot.
func TestMergerMetricsAndStatusPage(t *testing.T) {
	base := t.TempDir()
	size := int64(16 << 20)
	os.MkdirAll(filepath.Join(base, "lab"), 0o755)
	testutil.WriteGenImage(t, filepath.Join(base, "lab", "win11.r1"), size)
	testutil.WriteGenImage(t, filepath.Join(base, "ubuntu.r1"), size)
	addr := startMergerToken(t, base, "tok3n")
	c := &mergerClient{t: t, base: "http://" + addr, token: "tok3n"}
	done, up1 := c.session("lab/win11", 10)
	active, up2 := c.session("ubuntu", 4)
	form := url.Values{"uuid": {done}, "originalFileSize": {fmt.Sprint(size)}, "newFileSize": {fmt.Sprint(size)}}.Encode()
	if code, msg := c.do("POST", "/v1/file/merge", "application/x-www-form-urlencoded", []byte(form)); code != 200 {
		t.Fatalf("merge: %d %s", code, msg)
	}
	deadline := time.Now().Add(30 * time.Second)
	for c.state(done) != "Done" {
		if time.Now().After(deadline) {
			t.Fatalf("merge not done: %s", c.state(done))
		}
		time.Sleep(50 * time.Millisecond)
	}

	if code, _ := promtest.Fetch(t, "http://"+addr+"/metrics", ""); code != 401 {
		t.Errorf("/metrics without the token: %d", code)
	}
	s := promtest.Get(t, "http://"+addr+"/metrics", "tok3n")
	s.Promtool(t)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"dnbd3_merger_uploads_total", []string{"outcome", "stored"}, 14},
		{"dnbd3_merger_ingest_bytes_total", nil, float64(up1 + up2)},
		{"dnbd3_merger_merges_total", []string{"outcome", "done"}, 1},
		{"dnbd3_merger_merged_clusters_total", nil, 10},
		{"dnbd3_merger_sessions", []string{"state", "Done"}, 1},
		{"dnbd3_merger_sessions", []string{"state", "Active"}, 1},
		{"dnbd3_merger_merge_duration_seconds", nil, 1},
	}
	for _, ck := range checks {
		if v := s.Must(t, ck.name, ck.labels...); v != ck.want {
			t.Errorf("%s%v = %v, want %v", ck.name, ck.labels, v, ck.want)
		}
	}

	b := newBrowser(t)
	if _, err := chromedp.Call(b.ctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(b.ctx, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
		Headers: network.Headers{"Authorization": "Bearer tok3n"}}); err != nil {
		t.Fatal(err)
	}
	b.do(t, "open the merger's page", chromedp.Navigate("http://"+addr+"/"))
	b.waitJS(t, "two sessions", `document.querySelectorAll('#sessions tbody tr').length === 2`, 20*time.Second)
	row := func(id string) string {
		return b.text(t, `#sessions tbody tr[data-uuid="`+id+`"]`)
	}
	if r := row(done); !strings.Contains(r, "lab/win11") || !strings.Contains(r, "Done") || !strings.Contains(r, "r1 → r2") || !strings.Contains(r, "10 / 10 (100 %)") {
		t.Errorf("merged session row: %q", r)
	}
	if r := row(active); !strings.Contains(r, "ubuntu") || !strings.Contains(r, "Active") || !strings.Contains(r, "4") || !strings.Contains(r, "not started") {
		t.Errorf("active session row: %q", r)
	}
	if n := b.text(t, "#n-Done"); n != "1" {
		t.Errorf("Done card %q", n)
	}
	b.waitJS(t, "a refresh", `Number(document.body.dataset.polls) >= 2`, 20*time.Second)
	b.screenshot(t, "merger-status")
	b.checkConsole(t)
}
