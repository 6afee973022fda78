package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// examplesDir is examples/prometheus of the repository.
var examplesDir = filepath.Join("..", "..", "examples", "prometheus")

// needPromtool skips visibly without promtool (package prometheus).
func needPromtool(t *testing.T) {
	t.Helper()
	needTool(t, "promtool", "prometheus")
}

// TestPrometheusExamplesPromtool checks the scrape configuration and the
// alert rules with promtool, and runs the rules' unit tests.
func TestPrometheusExamplesPromtool(t *testing.T) {
	needPromtool(t)
	for _, args := range [][]string{
		{"check", "config", "--syntax-only", "prometheus.yml"},
		{"check", "rules", "alerts.yml"},
		{"test", "rules", "alerts_test.yml"},
	} {
		cmd := exec.Command("promtool", args...)
		cmd.Dir = examplesDir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// knownMetrics returns the metric names the three programs define, read
// from their collectors' source.
func knownMetrics(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{"up": true}
	sources := []struct {
		file   string
		re     *regexp.Regexp
		prefix string
	}{
		{"server/metrics_collect.go", regexp.MustCompile(`desc\("([a-z_]+)"`), "dnbd3_server_"},
		{"server/metrics_http.go", regexp.MustCompile(`"(dnbd3_[a-z_]+)"`), ""},
		{"cmd/dnbd3-nbd/metrics.go", regexp.MustCompile(`ndesc\("([a-z_]+)"`), "dnbd3_nbd_"},
		{"merger/metrics.go", regexp.MustCompile(`"(dnbd3_[a-z_]+)"`), ""},
		{"merger/httpapi/metrics.go", regexp.MustCompile(`"(dnbd3_[a-z_]+)"`), ""},
	}
	for _, s := range sources {
		src, err := os.ReadFile(filepath.Join("..", "..", s.file))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range s.re.FindAllStringSubmatch(string(src), -1) {
			known[s.prefix+m[1]] = true
		}
	}
	if len(known) < 40 {
		t.Fatalf("found only %d metric names in the collectors' source", len(known))
	}
	return known
}

// usedMetrics returns the dnbd3_* metric names an expression uses, with
// the histogram suffixes removed.
func usedMetrics(expr string) []string {
	var out []string
	for _, n := range regexp.MustCompile(`\bdnbd3_[a-z_]+`).FindAllString(expr, -1) {
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if strings.HasSuffix(n, suf) && !strings.HasSuffix(n, "_total"+suf) {
				n = strings.TrimSuffix(n, suf)
			}
		}
		out = append(out, n)
	}
	return out
}

// TestPrometheusExamplesUseRealMetrics: every metric the dashboard and the
// alert rules query exists in the programs, and the dashboard is valid
// JSON with a query per panel.
func TestPrometheusExamplesUseRealMetrics(t *testing.T) {
	known := knownMetrics(t)
	raw, err := os.ReadFile(filepath.Join(examplesDir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string
		Panels []struct {
			Type, Title string
			Targets     []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	exprs := 0
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs++
			for _, n := range usedMetrics(tg.Expr) {
				if !known[n] {
					t.Errorf("panel %q uses %s, which no program exports", p.Title, n)
				}
			}
		}
	}
	rules, err := os.ReadFile(filepath.Join(examplesDir, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range usedMetrics(string(rules)) {
		if !known[n] {
			t.Errorf("alerts.yml uses %s, which no program exports", n)
		}
	}
	if exprs < 20 {
		t.Errorf("dashboard has %d queries", exprs)
	}
}
