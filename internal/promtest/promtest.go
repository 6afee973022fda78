// Package promtest scrapes a Prometheus /metrics endpoint in tests, checks
// the exposition with promtool (Debian package prometheus) and looks up
// sample values by name and labels.
package promtest

import (
	"bytes"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape is one parsed scrape.
type Scrape struct {
	Body     []byte
	Families map[string]*dto.MetricFamily
}

// Get scrapes url (with header "Authorization: Bearer token" if token is
// set) and fails the test unless the answer is 200 and parses.
func Get(t testing.TB, url, token string) *Scrape {
	t.Helper()
	code, body := Fetch(t, url, token)
	if code != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", url, code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse %s: %v", url, err)
	}
	return &Scrape{Body: body, Families: fams}
}

// Fetch GETs url and returns the status and body.
func Fetch(t testing.TB, url, token string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	cl := &http.Client{Timeout: 20 * time.Second}
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

// Promtool runs `promtool check metrics` on the scrape and fails the test
// on any problem it reports. Without promtool it logs SKIP (make deps
// installs it).
func (s *Scrape) Promtool(t testing.TB) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("SKIP promtool check metrics: promtool not installed (apt-get install prometheus, or make deps)")
		return
	}
	cmd := exec.Command(path, "check", "metrics")
	cmd.Stdin = bytes.NewReader(s.Body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// Has reports whether a family name exists.
func (s *Scrape) Has(name string) bool { return s.Families[name] != nil }

// Value returns the value of the sample of family name whose labels
// include labels ("k", "v", ...): a counter's or gauge's value, a
// histogram's sample count. ok is false if there is none.
func (s *Scrape) Value(name string, labels ...string) (v float64, ok bool) {
	f := s.Families[name]
	if f == nil {
		return 0, false
	}
	for _, m := range f.Metric {
		if !matches(m, labels) {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

// Must is Value that fails the test when the sample is missing.
func (s *Scrape) Must(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, ok := s.Value(name, labels...)
	if !ok {
		t.Fatalf("no sample %s%v in the scrape:\n%s", name, labels, grep(s.Body, name))
	}
	return v
}

// Want fails the test (t.Errorf) unless the sample of family name with
// labels exists and equals want.
func (s *Scrape) Want(t testing.TB, want float64, name string, labels ...string) {
	t.Helper()
	if v := s.Must(t, name, labels...); v != want {
		t.Errorf("%s%v = %v, want %v", name, labels, v, want)
	}
}

// Sum adds the values of every sample of family name.
func (s *Scrape) Sum(name string) float64 {
	var sum float64
	if f := s.Families[name]; f != nil {
		for _, m := range f.Metric {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

func matches(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.Label {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// grep returns the lines of body that mention name (for failure messages).
func grep(body []byte, name string) string {
	var b strings.Builder
	for _, l := range strings.Split(string(body), "\n") {
		if strings.Contains(l, name) {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}
