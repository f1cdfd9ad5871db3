package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// Exit codes. They are part of meshctl's interface: scripts may rely on them.
const (
	exitOK          = 0 // the command did what was asked and everything it checked is fine
	exitError       = 1 // a daemon answered with an error, or the operation failed
	exitUsage       = 2 // bad command line: unknown command or flag, wrong arguments
	exitUnreachable = 3 // a daemon's admin API could not be reached (refused, timed out, no socket)
	exitNotFound    = 4 // the thing asked for does not exist, or the daemon does not serve that API
	exitUnhealthy   = 5 // reached, but not healthy: not ready, stale registry, acceleration off, upgrade rolled back or rejected
)

const exitCodesHelp = `Exit codes:
  0  OK: the command did what was asked and everything it checked is fine
  1  error: a daemon answered with an error, or the operation failed
  2  usage: unknown command or flag, wrong arguments
  3  unreachable: a daemon's admin API could not be reached (connection refused,
     timeout, no such socket); the message names the address and the flag to fix it
  4  not found: the registry, service or workload does not exist, or the daemon
     does not serve that API (e.g. an agent without VPP)
  5  unhealthy: reached but not healthy: a daemon not ready, a registry stale,
     acceleration off, an upgrade rolled back or rejected (the old Envoy serves on)`

// environment is everything meshctl takes from the process; tests pass their own.
type environment struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	now            func() time.Time
	isTTY          bool // stderr is a terminal: progress is drawn in place
}

// exitErr carries an exit code with the error meshctl prints.
type exitErr struct {
	code int
	err  error
}

func (e *exitErr) Error() string { return e.err.Error() }
func (e *exitErr) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	var ee *exitErr
	var ue *unreachableError
	if errors.As(err, &ee) || errors.As(err, &ue) {
		return err // already classified
	}
	return &exitErr{code: code, err: err}
}

func usageErr(format string, args ...any) error {
	return &exitErr{code: exitUsage, err: fmt.Errorf(format, args...)}
}

// codeOf maps an error to its exit code. Errors of meshctl's own carry theirs; anything else
// comes from cobra's parsing of the command line.
func codeOf(err error) int {
	var ee *exitErr
	if errors.As(err, &ee) {
		return ee.code
	}
	var ue *unreachableError
	if errors.As(err, &ue) {
		return exitUnreachable
	}
	var he *httpError
	if errors.As(err, &he) {
		return exitError
	}
	return exitUsage
}

// execute runs meshctl with args and returns the exit code.
func execute(ctx context.Context, args []string, env *environment) int {
	root, g := newRootCmd(env)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	g.mu.Lock()
	for _, stop := range g.cleanups {
		stop()
	}
	g.mu.Unlock()
	if err == nil {
		return exitOK
	}
	code := codeOf(err)
	fmt.Fprintf(env.stderr, "error: %v\n", err)
	if code == exitUsage && cmd != nil {
		fmt.Fprintf(env.stderr, "See '%s --help'.\n", cmd.CommandPath())
	}
	return code
}

// globals are the flags every command shares.
type globals struct {
	env            *environment
	daemons        map[string]*daemon // by short name: xds, upgrade, agent
	tokenFile      string
	output         string
	timeout        time.Duration
	connectTimeout time.Duration
	kubectl        string

	mu       sync.Mutex
	cleanups []func() // run when the command is over (port-forwards)
}

// atEnd runs f when the command is over.
func (g *globals) atEnd(f func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.cleanups = append(g.cleanups, f)
}

func newRootCmd(env *environment) (*cobra.Command, *globals) {
	g := &globals{env: env, daemons: map[string]*daemon{}}
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "meshctl reads and drives meshturbo's daemons through their admin APIs",
		Long: `meshctl reads and drives meshturbo's daemons through their admin APIs:

  meshturbo-xds      registries bridged into Istio, services, lazy-loading edges and scopes
  meshturbo-upgrade  the pod's Envoy sidecar and its hot upgrades
  meshturbo-agent    socket acceleration (eBPF) and VPP on the node

Each daemon's admin address comes from a flag, else an environment variable, else the
daemon's default (loopback). An address is host:port, http://host:port, unix:///path, or
pod/<name>[.<namespace>][:<port>] on a cluster: meshctl then runs kubectl port-forward to the
pod's admin port (the daemon's default port unless given) for as long as the command runs.
Admin APIs bound beyond loopback require a bearer token: pass it with --token-file.

` + exitCodesHelp,
		Example: `  # Is everything up? (health, readiness and versions of each daemon)
  meshctl status

  # Registries bridged into Istio, then one of them with its services and skipped entries
  meshctl registry list
  meshctl registry get consul
  meshctl registry get consul orders.service.consul -o yaml

  # What a workload calls, and the scope (Istio Sidecar) lazy loading built for it
  meshctl lazyload edges default/client
  meshctl lazyload scope client -n default

  # Hot-upgrade the Envoy of pod cart-7d9f in namespace shop, and follow it
  meshctl upgrade start pod/cart-7d9f.shop --binary /usr/local/bin/envoy-1.40

  # meshturbo-xds on a cluster, through a port-forward to one of its pods
  meshctl registry list --xds-admin pod/meshturbo-xds-5c7f9-abcde.meshturbo-system --token-file ./admin-token

  # A daemon exposed beyond loopback, with its token
  meshctl status --xds-admin 10.0.0.12:15051 --token-file ./admin-token`,
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			switch g.output {
			case "table", "json", "yaml":
			default:
				return usageErr("--output %q: use table, json or yaml", g.output)
			}
			if g.timeout <= 0 || g.connectTimeout <= 0 {
				return usageErr("--timeout and --connect-timeout must be positive")
			}
			return nil
		},
	}
	root.SetOut(env.stdout)
	root.SetErr(env.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &exitErr{code: exitUsage, err: err} })
	root.CompletionOptions.DisableDefaultCmd = true

	pf := root.PersistentFlags()
	for _, d := range knownDaemons() {
		d := d
		g.daemons[d.short] = &d
		def := d.defaultAddr
		if v := env.getenv(d.env); v != "" {
			def = v
		}
		pf.StringVar(&g.daemons[d.short].addr, d.flag, def,
			fmt.Sprintf("%s admin address (env %s)", d.name, d.env))
	}
	tokenDef := env.getenv("MESHTURBO_TOKEN_FILE")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
	pf.StringVar(&g.tokenFile, "token-file", tokenDef, "file with the admin API bearer token (env MESHTURBO_TOKEN_FILE)")
	pf.DurationVar(&g.timeout, "timeout", 10*time.Second, "how long one admin API request may take")
	pf.DurationVar(&g.connectTimeout, "connect-timeout", time.Second, "how long connecting to a daemon may take")
	pf.StringVar(&g.kubectl, "kubectl", "kubectl", "kubectl binary, used to port-forward to pod/<name> addresses")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))

	root.AddCommand(
		newStatusCmd(g),
		newRegistryCmd(g),
		newLazyloadCmd(g),
		newAccelCmd(g),
		newVPPCmd(g),
		newUpgradeCmd(g),
		newVersionCmd(g),
		newCompletionCmd(root),
	)
	return root, g
}

// run wraps a command body so that every error it returns carries an exit code.
func run(f func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		return withCode(exitError, f(cmd, args))
	}
}

// exactArgs and maxArgs are cobra's validators with usage exit codes and clearer messages.
func argsBetween(min, max int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < min || len(args) > max {
			if min == max {
				return usageErr("%s takes %s, got %d argument(s)", cmd.CommandPath(), what, len(args))
			}
			return usageErr("%s takes %s, got %d argument(s): %q", cmd.CommandPath(), what, len(args), args)
		}
		return nil
	}
}

func newCompletionCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish|powershell",
		Short: "Print a shell completion script",
		Long: `Print the completion script for a shell. Completion covers commands, flags, registry
names and workloads (asked from meshturbo-xds when it is reachable).`,
		Example: `  # bash, this shell only
  source <(meshctl completion bash)

  # bash, for good (needs the bash-completion package)
  meshctl completion bash > /etc/bash_completion.d/meshctl

  # zsh
  meshctl completion zsh > "${fpath[1]}/_meshctl"

  # fish
  meshctl completion fish > ~/.config/fish/completions/meshctl.fish`,
		ValidArgs: []string{"bash", "zsh", "fish", "powershell"},
		Args:      argsBetween(1, 1, "one shell: bash, zsh, fish or powershell"),
		RunE: run(func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(out, true)
			case "zsh":
				return root.GenZshCompletion(out)
			case "fish":
				return root.GenFishCompletion(out, true)
			case "powershell":
				return root.GenPowerShellCompletionWithDesc(out)
			}
			return usageErr("unknown shell %q: use bash, zsh, fish or powershell", args[0])
		}),
	}
}

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// plural returns "1 service", "2 services".
func plural(n int, word string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, word)
	}
	if strings.HasSuffix(word, "y") && !strings.HasSuffix(word, "ey") {
		return fmt.Sprintf("%d %sies", n, strings.TrimSuffix(word, "y"))
	}
	if strings.HasSuffix(word, "s") {
		return fmt.Sprintf("%d %ses", n, word)
	}
	return fmt.Sprintf("%d %ss", n, word)
}
