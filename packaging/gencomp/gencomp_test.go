package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// binDir holds the commands built for this test run.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gencomp-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := exec.Command("go", "build", "-o", dir+"/", "github.com/dnbd3go/dnbd3go/cmd/...").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the commands: %v\n%s", err, out)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var commandNames = []string{"dnbd3-server", "dnbd3-nbd", "dnbd3-merger", "dnbd3-bench", "dnbd3-cowtest"}

func TestParseFlags(t *testing.T) {
	help := `Usage: x

  -c, --config string       configuration directory (server.conf) (default "/etc/x")
  -n, --nodaemon            stay in the foreground
      --listen stringArray  listen URL
  -t, --test FILE           standard test: 8 sub-tests
  -r, --randomTest MOUNTED NORMAL  identical random writes
                                   continuation line
  -h, --help                show this help
`
	want := []Flag{
		{"c", "config", "string", `configuration directory (server.conf) (default "/etc/x")`},
		{"n", "nodaemon", "", "stay in the foreground"},
		{"", "listen", "stringArray", "listen URL"},
		{"t", "test", "FILE", "standard test: 8 sub-tests"},
		{"r", "randomTest", "MOUNTED NORMAL", "identical random writes"},
	}
	if got := ParseFlags(help); !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseFlags:\n got %+v\nwant %+v", got, want)
	}
}

func TestParseSubcommands(t *testing.T) {
	help := `Usage: dnbd3-nbd COMMAND [FLAGS]

Commands:
  attach   attach an image
           dnbd3-nbd attach -h "HOST" -i IMAGE
  detach   disconnect a device
           dnbd3-nbd detach /dev/nbdN [--force]

Run "dnbd3-nbd COMMAND --help".
`
	want := []Command{{Name: "attach", Summary: "attach an image"}, {Name: "detach", Summary: "disconnect a device", Device: true}}
	if got := ParseSubcommands(help, "dnbd3-nbd"); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

// generate writes the completions of every command into a temporary
// directory.
func generate(t *testing.T) (string, map[string]Command) {
	t.Helper()
	out := t.TempDir()
	cmds := map[string]Command{}
	for _, n := range commandNames {
		c, err := load(binDir, n)
		if err != nil {
			t.Fatal(err)
		}
		if err := write(out, c); err != nil {
			t.Fatal(err)
		}
		cmds[n] = c
	}
	return out, cmds
}

// complete runs the bash completion of words (the last one being
// completed) and returns COMPREPLY.
func complete(t *testing.T, script string, words ...string) []string {
	t.Helper()
	fn := "_" + funcName(words[0])
	var quoted []string
	for _, w := range words {
		quoted = append(quoted, "'"+w+"'")
	}
	prog := fmt.Sprintf("source %s\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\n%s\nprintf '%%s\\n' \"${COMPREPLY[@]}\"\n",
		script, strings.Join(quoted, " "), len(words)-1, fn)
	out, err := exec.Command("bash", "-c", prog).CombinedOutput()
	if err != nil {
		t.Fatalf("bash completion of %q: %v\n%s", words, err, out)
	}
	return strings.Fields(string(out))
}

// TestBashCompletion sources the generated scripts in bash and completes
// flags, subcommands and flag values.
func TestBashCompletion(t *testing.T) {
	dir, _ := generate(t)
	bash := func(name string) string { return filepath.Join(dir, "bash", name) }
	cases := []struct {
		words []string
		want  []string
	}{
		{[]string{"dnbd3-server", "--con"}, []string{"--config"}},
		{[]string{"dnbd3-server", "--log-format", ""}, []string{"text", "json"}},
		{[]string{"dnbd3-nbd", "att"}, []string{"attach"}},
		{[]string{"dnbd3-nbd", "attach", "--dev"}, []string{"--device"}},
		{[]string{"dnbd3-nbd", "attach", "--block-size", ""}, []string{"512", "4096"}},
		{[]string{"dnbd3-nbd", "-x", "get", "--out"}, []string{"--output"}},
		{[]string{"dnbd3-merger", "--tls-c"}, []string{"--tls-cert"}},
		{[]string{"dnbd3-bench", "--qu"}, []string{"--queue-depth"}},
		{[]string{"dnbd3-cowtest", "--random"}, []string{"--randomTest"}},
	}
	for _, c := range cases {
		if got := complete(t, bash(c.words[0]), c.words...); !reflect.DeepEqual(got, c.want) {
			t.Errorf("completing %q: got %q, want %q", c.words, got, c.want)
		}
	}
}

// TestZshFishSyntax checks the zsh and fish scripts with the shells'
// own parsers.
func TestZshFishSyntax(t *testing.T) {
	dir, _ := generate(t)
	for _, sh := range []struct{ shell, sub, glob string }{{"bash", "bash", "*"}, {"zsh", "zsh", "_*"}, {"fish", "fish", "*.fish"}} {
		if _, err := exec.LookPath(sh.shell); err != nil {
			t.Logf("SKIP: %s not installed (scripts/deps.sh installs it): its scripts are not syntax-checked", sh.shell)
			continue
		}
		files, _ := filepath.Glob(filepath.Join(dir, sh.sub, sh.glob))
		if len(files) != len(commandNames) {
			t.Fatalf("%s: %d scripts, want %d", sh.shell, len(files), len(commandNames))
		}
		for _, f := range files {
			if out, err := exec.Command(sh.shell, "-n", f).CombinedOutput(); err != nil {
				t.Errorf("%s -n %s: %v\n%s", sh.shell, f, err, out)
			}
		}
	}
}

// TestManPagesDocumentEveryFlag checks that each command's man page
// (docs/man/NAME.N.md) mentions every long flag its --help lists, and
// every subcommand of dnbd3-nbd.
func TestManPagesDocumentEveryFlag(t *testing.T) {
	_, cmds := generate(t)
	for _, n := range commandNames {
		pages, _ := filepath.Glob(filepath.Join("..", "..", "docs", "man", n+".[18].md"))
		if len(pages) != 1 {
			t.Errorf("%s: want one man page docs/man/%s.1.md or .8.md, found %v", n, n, pages)
			continue
		}
		b, err := os.ReadFile(pages[0])
		if err != nil {
			t.Fatal(err)
		}
		text := string(b)
		c := cmds[n]
		flags := append([]Flag(nil), c.Flags...)
		for _, s := range c.Subs {
			if !regexp.MustCompile(`\*\*` + s.Name + `\*\*`).MatchString(text) {
				t.Errorf("%s: subcommand %s is not documented (**%s**)", pages[0], s.Name, s.Name)
			}
			flags = append(flags, s.Flags...)
		}
		for _, f := range flags {
			if !regexp.MustCompile(`--` + regexp.QuoteMeta(f.Long) + `\b`).MatchString(text) {
				t.Errorf("%s: flag --%s is not documented", pages[0], f.Long)
			}
		}
	}
}
