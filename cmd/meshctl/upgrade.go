package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/spf13/cobra"
)

// pollInterval is how often an upgrade's progress is read.
const pollInterval = 200 * time.Millisecond

func newUpgradeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "upgrade",
		Short: "Hot-upgrade a pod's Envoy through meshturbo-upgrade, and show its state",
		Long: `Hot-upgrade the Envoy that meshturbo-upgrade runs in a pod: the new Envoy takes the
listen sockets from the running one, is probed, and the old one drains; if the new one fails,
it is stopped and the old one serves on (rolled back). No request fails either way.

<pod or address> is pod/<name>[.<namespace>] (reached with kubectl port-forward to the pod's
port 15052), or meshturbo-upgrade's admin address: host:port or unix:///path. Default:
--upgrade-admin.`,
	}
	cmd.AddCommand(newUpgradeStartCmd(g), newUpgradeStatusCmd(g))
	return cmd
}

func newUpgradeStartCmd(g *globals) *cobra.Command {
	var binary, bootstrap string
	var wait time.Duration
	var progress string
	cmd := &cobra.Command{
		Use:   "start [<pod or address>]",
		Short: "Start a hot upgrade and follow it until it is over",
		Long: `Start a hot upgrade (POST /v1/upgrade) and follow its phases — prechecking, handing off,
probing, draining — until it is over, then print the result. The progress goes to stderr:
drawn in place on a terminal, one line per phase otherwise. The result goes to stdout.

--binary and --bootstrap are paths on the pod's file system; without them the running
binary and bootstrap are started again (a restart into a new epoch).

Exit code: 0 upgraded; 5 rolled back or rejected by the precheck (the old Envoy serves on);
1 another upgrade is running, or the request failed.`,
		Example: `  # the sidecar of pod cart-7d9f in namespace shop (kubectl port-forward under the hood)
  meshctl upgrade start pod/cart-7d9f.shop --binary /usr/local/bin/envoy-1.40

  # the local sidecar, result as JSON
  meshctl upgrade start -o json`,
		Args: argsBetween(0, 1, "at most one pod or address"),
		RunE: run(func(cmd *cobra.Command, args []string) error {
			switch progress {
			case "auto", "tty", "plain", "none":
			default:
				return usageErr("--progress %q: use auto, tty, plain or none", progress)
			}
			c, err := g.client(cmd.Context(), "upgrade", addrArg(args))
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			var before upgradeStatus
			if _, err := c.getJSON(ctx, "/v1/upgrade", &before); err != nil {
				return err
			}
			body, _ := json.Marshal(map[string]string{"binary": binary, "bootstrap_path": bootstrap})
			type answer struct {
				code int
				body []byte
				err  error
			}
			wctx, cancel := context.WithTimeout(ctx, wait)
			defer cancel()
			done := make(chan answer, 1)
			go func() {
				code, b, err := c.do(wctx, http.MethodPost, "/v1/upgrade", body, 0)
				done <- answer{code, b, err}
			}()

			pr := g.newProgress(cmd.ErrOrStderr(), progress, c.d.addr, before)
			tick := time.NewTicker(pollInterval)
			defer tick.Stop()
			var ans answer
		follow:
			for {
				select {
				case ans = <-done:
					break follow
				case <-tick.C:
					var st upgradeStatus
					if _, err := c.getJSON(wctx, "/v1/upgrade", &st); err == nil {
						pr.update(st)
					}
				}
			}
			pr.finish()
			if ans.err != nil {
				if wctx.Err() != nil && ctx.Err() == nil {
					return fmt.Errorf("the upgrade at %s did not finish within --wait %s; it goes on there: follow it with meshctl upgrade status --watch %s",
						c.d.addr, wait, c.d.addr)
				}
				var ue *unreachableError
				if errors.As(ans.err, &ue) {
					return fmt.Errorf("%w; if the request reached it, the upgrade goes on: check with meshctl upgrade status --watch %s", ans.err, c.d.addr)
				}
				return ans.err
			}
			var res upgradeResult
			switch ans.code {
			case http.StatusOK, http.StatusUnprocessableEntity, http.StatusInternalServerError:
				if err := json.Unmarshal(ans.body, &res); err != nil || res.Outcome == "" {
					return c.httpErr(http.MethodPost, "/v1/upgrade", ans.code, ans.body)
				}
			case http.StatusConflict:
				he := c.httpErr(http.MethodPost, "/v1/upgrade", ans.code, ans.body)
				return fmt.Errorf("%s: another upgrade is running at %s; follow it with meshctl upgrade status --watch %s", he.msg, c.d.addr, c.d.addr)
			default:
				return c.httpErr(http.MethodPost, "/v1/upgrade", ans.code, ans.body)
			}
			if err := g.render(cmd.OutOrStdout(), json.RawMessage(ans.body), func(w io.Writer) { describeResult(w, res) }); err != nil {
				return err
			}
			if res.Outcome != outcomeUpgraded {
				return withCode(exitUnhealthy, fmt.Errorf("upgrade at %s %s: %s; the old Envoy (epoch %d) serves on",
					c.d.addr, res.Outcome, res.Error, res.FromEpoch))
			}
			return nil
		}),
	}
	f := cmd.Flags()
	f.StringVar(&binary, "binary", "", "Envoy binary to upgrade to (a path in the pod; default: the running one)")
	f.StringVar(&bootstrap, "bootstrap", "", "bootstrap file for the new epoch (a path in the pod; default: the running one)")
	f.DurationVar(&wait, "wait", 10*time.Minute, "how long to follow the upgrade (it includes the old Envoy's drain)")
	f.StringVar(&progress, "progress", "auto", "progress display on stderr: auto (drawn in place on a terminal), tty, plain or none")
	return cmd
}

func newUpgradeStatusCmd(g *globals) *cobra.Command {
	var watch bool
	cmd := &cobra.Command{
		Use:   "status [<pod or address>]",
		Short: "Show the running Envoy: epoch, version, phase and the last upgrade",
		Long: `Show meshturbo-upgrade's Envoy (GET /v1/upgrade): its epoch, version and phase, how many
upgrades, rollbacks and rejections it had, and the last upgrade's result with its timings.
With --watch, an upgrade in progress is followed until it is over.`,
		Example: `  meshctl upgrade status
  meshctl upgrade status pod/cart-7d9f.shop --watch
  meshctl upgrade status 127.0.0.1:15052
  meshctl upgrade status unix:///var/run/meshturbo/upgrade.sock -o json`,
		Args: argsBetween(0, 1, "at most one pod or address"),
		RunE: run(func(cmd *cobra.Command, args []string) error {
			c, err := g.client(cmd.Context(), "upgrade", addrArg(args))
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			var st upgradeStatus
			raw, err := c.getJSON(ctx, "/v1/upgrade", &st)
			if err != nil {
				return err
			}
			if watch && inUpgrade(st.Phase) {
				pr := g.newProgress(cmd.ErrOrStderr(), "auto", c.d.addr, st)
				pr.phase = "" // show the phase it is in now
				pr.update(st)
				tick := time.NewTicker(pollInterval)
				for inUpgrade(st.Phase) {
					select {
					case <-ctx.Done():
						tick.Stop()
						pr.finish()
						return ctx.Err()
					case <-tick.C:
					}
					if raw, err = c.getJSON(ctx, "/v1/upgrade", &st); err != nil {
						tick.Stop()
						pr.finish()
						return err
					}
					pr.update(st)
				}
				tick.Stop()
				pr.finish()
			}
			now := g.env.now()
			return g.render(cmd.OutOrStdout(), raw, func(w io.Writer) {
				field(w, "Address", c.d.addr)
				field(w, "Phase", st.Phase)
				field(w, "Epoch", fmt.Sprintf("%d (pid %d, started %s)", st.Epoch, st.PID, ago(now, st.Started)))
				field(w, "Envoy", fmt.Sprintf("%s (%s)", st.Version, st.Binary))
				field(w, "Hot-restart version", st.HotRestartVersion)
				field(w, "Upgrades", fmt.Sprintf("%d (rollbacks %d, rejected %d)", st.Upgrades, st.Rollbacks, st.Rejected))
				if st.AdminClosed {
					field(w, "Envoy admin", "closed by a rolled-back hand-off; back after the next upgrade")
				}
				if r := st.Last; r != nil {
					fmt.Fprintln(w)
					fmt.Fprintf(w, "Last upgrade (%s):\n", ago(now, r.Started))
					describeResult(indent{w}, *r)
				}
			})
		}),
	}
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "follow an upgrade in progress until it is over")
	return cmd
}

func addrArg(args []string) string {
	if len(args) == 1 {
		return args[0]
	}
	return ""
}

func inUpgrade(phase string) bool {
	switch phase {
	case phasePrechecking, phaseHandingOff, phaseProbing, phaseDraining, phaseRollingBack:
		return true
	}
	return false
}

func describeResult(w io.Writer, r upgradeResult) {
	field(w, "Outcome", r.Outcome)
	field(w, "Error", r.Error)
	field(w, "Epoch", fmt.Sprintf("%d → %d", r.FromEpoch, r.ToEpoch))
	to := r.ToVersion
	if to == "" {
		to = "?"
	}
	field(w, "Envoy", fmt.Sprintf("%s → %s", r.FromVersion, to))
	field(w, "Took", fmt.Sprintf("%s (precheck %s, hand-off %s, probe %s, drain %s)",
		ms(r.TotalMS), ms(r.PrecheckMS), ms(r.HandoffMS), ms(r.ProbeMS), ms(r.DrainMS)))
	old := fmt.Sprintf("%s at drain", plural(r.OldConnections, "connection"))
	if r.OldStopped != "" {
		old += ", stopped: " + r.OldStopped
	}
	field(w, "Old epoch", old)
}

// indent prefixes each line with two spaces.
type indent struct{ w io.Writer }

func (i indent) Write(p []byte) (int, error) {
	var out []byte
	start := true
	for _, b := range p {
		if start {
			out = append(out, ' ', ' ')
		}
		out = append(out, b)
		start = b == '\n'
	}
	if _, err := i.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// progress shows an upgrade's phases: in place on a terminal, a line per change otherwise.
type progress struct {
	w       io.Writer
	mode    string // tty, plain or none
	addr    string
	start   time.Time
	now     func() time.Time
	phase   string
	frame   int
	drawn   bool
	lastLen int
}

var phaseSteps = map[string]string{
	phasePrechecking: "[1/4] prechecking the new Envoy",
	phaseHandingOff:  "[2/4] handing the listen sockets to the new epoch",
	phaseProbing:     "[3/4] probing the new epoch",
	phaseDraining:    "[4/4] draining the old epoch",
	phaseRollingBack: "rolling back: the new epoch failed",
	phaseServing:     "serving",
	phaseStarting:    "starting",
}

func (g *globals) newProgress(w io.Writer, mode, addr string, before upgradeStatus) *progress {
	if mode == "auto" {
		mode = "plain"
		if g.env.isTTY {
			mode = "tty"
		}
	}
	p := &progress{w: w, mode: mode, addr: addr, now: g.env.now, start: g.env.now(), phase: before.Phase}
	if mode != "none" {
		fmt.Fprintf(w, "upgrading the Envoy at %s (epoch %d, %s)\n", addr, before.Epoch, before.Version)
	}
	return p
}

var spinner = []string{"⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"}

func (p *progress) update(st upgradeStatus) {
	elapsed := p.now().Sub(p.start).Round(100 * time.Millisecond)
	step := phaseSteps[st.Phase]
	if step == "" {
		step = st.Phase
	}
	switch p.mode {
	case "tty":
		line := fmt.Sprintf("%s %s  %s", spinner[p.frame%len(spinner)], step, elapsed)
		p.frame++
		pad := ""
		if n := p.lastLen - len([]rune(line)); n > 0 {
			pad = fmt.Sprintf("%*s", n, "")
		}
		fmt.Fprintf(p.w, "\r%s%s", line, pad)
		p.lastLen, p.drawn = len([]rune(line)), true
	case "plain":
		if st.Phase != p.phase && st.Phase != phaseServing {
			fmt.Fprintf(p.w, "%6s  %s\n", elapsed, step)
		}
	}
	p.phase = st.Phase
}

func (p *progress) finish() {
	if p.mode == "tty" && p.drawn {
		fmt.Fprintf(p.w, "\r%*s\r", p.lastLen, "")
	}
	if p.mode != "none" {
		fmt.Fprintf(p.w, "done after %s\n", p.now().Sub(p.start).Round(100*time.Millisecond))
	}
}
