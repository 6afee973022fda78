// Command gencomp writes bash, zsh and fish completions for the dnbd3go
// commands. It reads each command's real flags from its --help output
// (pflag's flag list, and for dnbd3-nbd the subcommand list and each
// subcommand's --help), so the completions never drift from the code:
//
//	go run ./packaging/gencomp -bin DIR -out DIR [COMMAND ...]
//
// DIR/bash/COMMAND, DIR/zsh/_COMMAND and DIR/fish/COMMAND.fish are written
// for every COMMAND (default: all five commands).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// Flag is one command-line flag as --help shows it.
type Flag struct {
	Short string // "c" or ""
	Long  string // "config"
	Arg   string // value placeholder ("string", "FILE"), "" for a switch
	Desc  string // first line of the description
}

// Command is a command or a subcommand.
type Command struct {
	Name    string
	Summary string // for subcommands
	Flags   []Flag
	Device  bool // takes a /dev/nbdN argument
	Subs    []Command
}

// flagLine matches a flag line of pflag's PrintDefaults (and of
// dnbd3-cowtest's own list): "  -c, --config string   description".
var flagLine = regexp.MustCompile(`^\s+(?:-(\S), )?--([A-Za-z0-9][\w-]*)((?: \S+)*?)(?:\s{2,}(.*))?$`)

// ParseFlags returns the flags listed in a --help text.
func ParseFlags(help string) []Flag {
	var fs []Flag
	seen := map[string]bool{}
	for _, l := range strings.Split(help, "\n") {
		m := flagLine.FindStringSubmatch(l)
		if m == nil || m[2] == "help" || seen[m[2]] {
			continue
		}
		seen[m[2]] = true
		fs = append(fs, Flag{Short: m[1], Long: m[2], Arg: strings.TrimSpace(m[3]), Desc: strings.TrimSpace(m[4])})
	}
	return fs
}

// subLine matches a subcommand of "dnbd3-nbd --help": "  attach   summary".
var subLine = regexp.MustCompile(`^  ([a-z][a-z-]*)\s{2,}(.*)$`)

// ParseSubcommands returns the subcommands of a "Commands:" section with
// their summaries; Device is set when the usage line under a subcommand
// takes /dev/nbdN as its first argument.
func ParseSubcommands(help, prog string) []Command {
	var subs []Command
	in := false
	for _, l := range strings.Split(help, "\n") {
		switch {
		case strings.HasPrefix(l, "Commands:"):
			in = true
		case !in:
		case strings.TrimSpace(l) == "":
			in = false
		default:
			if m := subLine.FindStringSubmatch(l); m != nil {
				subs = append(subs, Command{Name: m[1], Summary: m[2]})
			} else if f := strings.Fields(l); len(subs) > 0 && len(f) >= 3 && f[0] == prog {
				subs[len(subs)-1].Device = strings.HasPrefix(f[2], "/dev/nbd")
			}
		}
	}
	return subs
}

// helpText runs a command with --help and returns what it printed (on
// stdout or stderr).
func helpText(bin string, args ...string) (string, error) {
	out, err := exec.Command(bin, append(args, "--help")...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s %s --help: %v\n%s", bin, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// load describes command name from the binary in dir.
func load(dir, name string) (Command, error) {
	bin := filepath.Join(dir, name)
	help, err := helpText(bin)
	if err != nil {
		return Command{}, err
	}
	c := Command{Name: name, Flags: ParseFlags(help)}
	for _, s := range ParseSubcommands(help, name) {
		sh, err := helpText(bin, s.Name)
		if err != nil {
			return Command{}, err
		}
		s.Flags = ParseFlags(sh)
		c.Subs = append(c.Subs, s)
	}
	if len(c.Flags) == 0 && len(c.Subs) == 0 {
		return Command{}, fmt.Errorf("%s --help lists no flags", name)
	}
	return c, nil
}

func main() {
	binDir := flag.String("bin", "bin", "directory with the built commands")
	outDir := flag.String("out", "out/completions", "output directory")
	flag.Parse()
	names := flag.Args()
	if len(names) == 0 {
		names = []string{"dnbd3-server", "dnbd3-nbd", "dnbd3-merger", "dnbd3-bench", "dnbd3-cowtest"}
	}
	for _, n := range names {
		c, err := load(*binDir, n)
		if err == nil {
			err = write(*outDir, c)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "gencomp:", err)
			os.Exit(1)
		}
	}
}

// write writes the three completion files of c.
func write(dir string, c Command) error {
	files := map[string]string{
		filepath.Join(dir, "bash", c.Name):         Bash(c),
		filepath.Join(dir, "zsh", "_"+c.Name):      Zsh(c),
		filepath.Join(dir, "fish", c.Name+".fish"): Fish(c),
	}
	for path, text := range files {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}
