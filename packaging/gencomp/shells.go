package main

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// valueKind is what a flag's value completes to.
type valueKind int

const (
	valueNone   valueKind = iota // a switch
	valueAny                     // free text, numbers: nothing to offer
	valueFile                    // a file name
	valueDir                     // a directory
	valueHost                    // a host name
	valueDevice                  // /dev/nbdN
	valueChoice                  // one of choices[Long]
)

// choices are the fixed values of some flags.
var choices = map[string][]string{
	"log-format": {"text", "json"},
	"log-level":  {"error", "warning", "minor", "info", "debug", "debug2"},
	"block-size": {"512", "4096"},
	"pattern":    {"seq", "rand"},
}

var (
	dirFlag  = regexp.MustCompile(`(^config$|-dir$)`)
	fileFlag = regexp.MustCompile(`(file|settings|cert|key|^log$|^crc$|^output$|-ca$|^test|^verify$|^compare$|^special|^random|^nbd-cmd$)`)
)

// kind classifies the value of f.
func kind(f Flag) valueKind {
	switch {
	case f.Arg == "":
		return valueNone
	case choices[f.Long] != nil:
		return valueChoice
	case f.Long == "device" || strings.Contains(f.Arg, "/dev/nbd"):
		return valueDevice
	case f.Long == "host":
		return valueHost
	case f.Arg == "DIR" || dirFlag.MatchString(f.Long) || strings.Contains(f.Desc, " DIR"):
		return valueDir
	case strings.Contains(f.Arg, "FILE") || fileFlag.MatchString(f.Long):
		return valueFile
	}
	return valueAny
}

// funcName turns a command name into a shell identifier.
func funcName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// words returns the flag spellings of fs ("--config -c ...").
func words(fs []Flag) string {
	var w []string
	for _, f := range fs {
		w = append(w, "--"+f.Long)
		if f.Short != "" {
			w = append(w, "-"+f.Short)
		}
	}
	return strings.Join(w, " ")
}

// Bash returns a bash completion script for c (for
// /usr/share/bash-completion/completions/NAME; it needs no helpers from
// the bash-completion package).
func Bash(c Command) string {
	var b strings.Builder
	fn := "_" + funcName(c.Name)
	fmt.Fprintf(&b, "# bash completion for %s (generated from its --help by packaging/gencomp)\n\n", c.Name)
	fmt.Fprintf(&b, "%s_value() {\n\tlocal cur=$1 prev=$2\n\tcase $prev in\n", fn)
	cases := map[valueKind][]string{}
	choiceCases := map[string][]string{}
	all := append([]Flag(nil), c.Flags...)
	for _, s := range c.Subs {
		all = append(all, s.Flags...)
	}
	for _, f := range all {
		spell := []string{"--" + f.Long}
		if f.Short != "" {
			spell = append(spell, "-"+f.Short)
		}
		k := kind(f)
		if k == valueChoice {
			key := strings.Join(choices[f.Long], " ")
			choiceCases[key] = appendNew(choiceCases[key], spell...)
		} else if k != valueNone {
			cases[k] = appendNew(cases[k], spell...)
		}
	}
	for _, key := range sortedKeys(choiceCases) {
		fmt.Fprintf(&b, "\t%s) COMPREPLY=($(compgen -W '%s' -- \"$cur\")); return 0 ;;\n", strings.Join(choiceCases[key], "|"), key)
	}
	actions := map[valueKind]string{
		valueFile:   `compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))`,
		valueDir:    `compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur"))`,
		valueHost:   `COMPREPLY=($(compgen -A hostname -- "$cur"))`,
		valueDevice: `COMPREPLY=($(compgen -G "/dev/nbd*[0-9]" | grep -v p | grep -- "^$cur"))`,
		valueAny:    `COMPREPLY=()`,
	}
	for _, k := range []valueKind{valueFile, valueDir, valueHost, valueDevice, valueAny} {
		if len(cases[k]) > 0 {
			fmt.Fprintf(&b, "\t%s) %s; return 0 ;;\n", strings.Join(cases[k], "|"), actions[k])
		}
	}
	b.WriteString("\tesac\n\treturn 1\n}\n\n")

	fmt.Fprintf(&b, "%s() {\n\tlocal cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}\n", fn)
	fmt.Fprintf(&b, "\tCOMPREPLY=()\n\t%s_value \"$cur\" \"$prev\" && return\n", fn)
	if len(c.Subs) == 0 {
		fmt.Fprintf(&b, "\tCOMPREPLY=($(compgen -W '%s' -- \"$cur\"))\n", words(c.Flags))
	} else {
		var names []string
		for _, s := range c.Subs {
			names = append(names, s.Name)
		}
		b.WriteString("\tlocal i sub=\n\tfor ((i = 1; i < COMP_CWORD; i++)); do\n")
		b.WriteString("\t\tcase ${COMP_WORDS[i]} in -*) ;; *) sub=${COMP_WORDS[i]}; break ;; esac\n\tdone\n")
		fmt.Fprintf(&b, "\tif [[ -z $sub ]]; then\n\t\tCOMPREPLY=($(compgen -W '%s help version --help --version' -- \"$cur\"))\n\t\treturn\n\tfi\n", strings.Join(names, " "))
		b.WriteString("\tcase $sub in\n")
		for _, s := range c.Subs {
			fmt.Fprintf(&b, "\t%s)\n", s.Name)
			if s.Device {
				b.WriteString("\t\tif [[ $cur != -* ]]; then\n\t\t\tCOMPREPLY=($(compgen -G \"/dev/nbd*[0-9]\" | grep -v p | grep -- \"^$cur\"))\n\t\t\treturn\n\t\tfi\n")
			}
			fmt.Fprintf(&b, "\t\tCOMPREPLY=($(compgen -W '%s --help' -- \"$cur\")) ;;\n", words(s.Flags))
		}
		fmt.Fprintf(&b, "\thelp) COMPREPLY=($(compgen -W '%s' -- \"$cur\")) ;;\n", strings.Join(names, " "))
		b.WriteString("\tesac\n")
	}
	b.WriteString("}\n\n")
	fmt.Fprintf(&b, "complete -o bashdefault -o default -F %s %s\n", fn, c.Name)
	return b.String()
}

// zshQuote makes s safe inside a single-quoted _arguments spec.
func zshQuote(s string) string {
	r := strings.NewReplacer("'", "", "[", "(", "]", ")", ":", "\\:", "\\", "")
	return r.Replace(s)
}

// zshSpecs returns the _arguments specs of fs, one per line.
func zshSpecs(fs []Flag) []string {
	var specs []string
	for _, f := range fs {
		action := ""
		switch kind(f) {
		case valueNone:
		case valueChoice:
			action = fmt.Sprintf(":%s:(%s)", f.Long, strings.Join(choices[f.Long], " "))
		case valueFile:
			action = fmt.Sprintf(":%s:_files", f.Long)
		case valueDir:
			action = fmt.Sprintf(":%s:_files -/", f.Long)
		case valueHost:
			action = fmt.Sprintf(":%s:_hosts", f.Long)
		case valueDevice:
			action = fmt.Sprintf(":%s:_files -g \"nbd<->\" -W /dev", f.Long)
		default:
			action = fmt.Sprintf(":%s: ", f.Long)
		}
		desc := zshQuote(f.Desc)
		if f.Short != "" {
			specs = append(specs, fmt.Sprintf(`'(-%s --%s)'{-%s,--%s}'[%s]%s'`, f.Short, f.Long, f.Short, f.Long, desc, action))
		} else {
			specs = append(specs, fmt.Sprintf(`'--%s[%s]%s'`, f.Long, desc, action))
		}
	}
	return specs
}

// Zsh returns a zsh completion function for c (a file _NAME in $fpath).
func Zsh(c Command) string {
	var b strings.Builder
	fmt.Fprintf(&b, "#compdef %s\n# zsh completion for %s (generated from its --help by packaging/gencomp)\n\n", c.Name, c.Name)
	if len(c.Subs) == 0 {
		b.WriteString("_arguments -s \\\n")
		for _, s := range zshSpecs(c.Flags) {
			fmt.Fprintf(&b, "\t%s \\\n", s)
		}
		b.WriteString("\t'--help[show the help]'\n")
		return b.String()
	}
	fn := "_" + funcName(c.Name)
	fmt.Fprintf(&b, "%s() {\n\tlocal curcontext=$curcontext state line\n\tlocal -a subcommands\n\tsubcommands=(\n", fn)
	for _, s := range c.Subs {
		fmt.Fprintf(&b, "\t\t'%s:%s'\n", s.Name, zshQuote(s.Summary))
	}
	b.WriteString("\t)\n\t_arguments -C '1: :->command' '*:: :->args' && return\n\tcase $state in\n")
	b.WriteString("\tcommand) _describe -t commands command subcommands ;;\n\targs)\n\t\tcase $line[1] in\n")
	for _, s := range c.Subs {
		fmt.Fprintf(&b, "\t\t%s)\n\t\t\t_arguments -s \\\n", s.Name)
		for _, spec := range zshSpecs(s.Flags) {
			fmt.Fprintf(&b, "\t\t\t\t%s \\\n", spec)
		}
		if s.Device {
			b.WriteString("\t\t\t\t'1:device:_files -g \"nbd<->\" -W /dev' \\\n")
		}
		b.WriteString("\t\t\t\t'--help[show the help]' ;;\n")
	}
	b.WriteString("\t\tesac ;;\n\tesac\n}\n\n")
	fmt.Fprintf(&b, "%s \"$@\"\n", fn)
	return b.String()
}

// fishQuote quotes s for fish.
func fishQuote(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// fishLines returns the complete commands for flags fs under condition
// cond ("" for none).
func fishLines(name, cond string, fs []Flag) []string {
	var out []string
	for _, f := range fs {
		l := "complete -c " + name
		if cond != "" {
			l += " -n " + fishQuote(cond)
		}
		if f.Short != "" {
			l += " -s " + f.Short
		}
		l += " -l " + f.Long
		switch kind(f) {
		case valueNone:
			l += " -f"
		case valueChoice:
			l += " -x -a " + fishQuote(strings.Join(choices[f.Long], " "))
		case valueFile, valueDir:
			l += " -r -F"
		case valueHost:
			l += " -x -a '(__fish_print_hostnames)'"
		case valueDevice:
			l += " -x -a '(string match -r \"^/dev/nbd[0-9]+\\$\" /dev/nbd*)'"
		default:
			l += " -x"
		}
		if f.Desc != "" {
			l += " -d " + fishQuote(f.Desc)
		}
		out = append(out, l)
	}
	return out
}

// Fish returns a fish completion script for c (NAME.fish in
// vendor_completions.d).
func Fish(c Command) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# fish completion for %s (generated from its --help by packaging/gencomp)\n", c.Name)
	if len(c.Subs) == 0 {
		fmt.Fprintf(&b, "complete -c %s -f\n", c.Name)
		for _, l := range fishLines(c.Name, "", c.Flags) {
			b.WriteString(l + "\n")
		}
		return b.String()
	}
	var names []string
	for _, s := range c.Subs {
		names = append(names, s.Name)
	}
	fmt.Fprintf(&b, "complete -c %s -f\n", c.Name)
	for _, s := range c.Subs {
		fmt.Fprintf(&b, "complete -c %s -n '__fish_use_subcommand' -a %s -d %s\n", c.Name, s.Name, fishQuote(s.Summary))
	}
	for _, s := range c.Subs {
		cond := "__fish_seen_subcommand_from " + s.Name
		for _, l := range fishLines(c.Name, cond, s.Flags) {
			b.WriteString(l + "\n")
		}
		if s.Device {
			fmt.Fprintf(&b, "complete -c %s -n %s -a '(string match -r \"^/dev/nbd[0-9]+\\$\" /dev/nbd*)'\n", c.Name, fishQuote(cond))
		}
	}
	fmt.Fprintf(&b, "complete -c %s -n '__fish_seen_subcommand_from help' -a %s\n", c.Name, fishQuote(strings.Join(names, " ")))
	return b.String()
}

func appendNew(list []string, items ...string) []string {
	for _, it := range items {
		found := false
		for _, x := range list {
			found = found || x == it
		}
		if !found {
			list = append(list, it)
		}
	}
	return list
}

func sortedKeys(m map[string][]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
