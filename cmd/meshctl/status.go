package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"

	"github.com/spf13/cobra"

	"github.com/meshturbo/meshturbo/internal/admin"
)

// daemonStatus is one row of meshctl status.
type daemonStatus struct {
	Daemon    string             `json:"daemon"`
	Address   string             `json:"address"`
	Reachable bool               `json:"reachable"`
	Healthy   bool               `json:"healthy"`
	Ready     bool               `json:"ready"`
	NotReady  string             `json:"notReadyReason,omitempty"`
	Version   *admin.VersionInfo `json:"version,omitempty"`
	Summary   string             `json:"summary,omitempty"`
	// Degraded is why a ready daemon is still not well: a stale registry, acceleration off.
	Degraded string `json:"degraded,omitempty"`
	Error    string `json:"error,omitempty"`

	err error
}

type statusReport struct {
	Daemons []daemonStatus `json:"daemons"`
}

func newStatusCmd(g *globals) *cobra.Command {
	var only []string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every meshturbo daemon: reachable, healthy, ready, version and a summary",
		Long: `Show every meshturbo daemon meshctl is pointed at: whether its admin API answers,
/healthz and /readyz, its version, and a one-line summary (registries and services for
meshturbo-xds, the Envoy epoch and phase for meshturbo-upgrade, acceleration for
meshturbo-agent). The daemons are asked in parallel; one that does not answer within
--connect-timeout is reported as unreachable with the address tried and how to change it.

Exit code: 0 when every daemon asked is reachable, ready and healthy; 3 when one is
unreachable; 5 when one is not ready, has a stale registry or runs without acceleration.`,
		Example: `  meshctl status
  meshctl status --daemons xds -o json
  MESHTURBO_XDS_ADMIN=unix:///run/meshturbo/xds.sock meshctl status --daemons xds`,
		Args: argsBetween(0, 0, "no arguments"),
		RunE: run(func(cmd *cobra.Command, _ []string) error {
			var ds []daemon
			for _, d := range knownDaemons() {
				if len(only) == 0 || slices.Contains(only, d.short) {
					ds = append(ds, *g.daemons[d.short])
				}
			}
			for _, o := range only {
				if _, ok := g.daemons[o]; !ok {
					return usageErr("--daemons %q: use xds, upgrade and/or agent", o)
				}
			}
			rep := statusReport{Daemons: make([]daemonStatus, len(ds))}
			var wg sync.WaitGroup
			for i, d := range ds {
				wg.Go(func() { rep.Daemons[i] = g.probe(cmd.Context(), d) })
			}
			wg.Wait()
			if err := g.render(cmd.OutOrStdout(), rep, func(w io.Writer) {
				row(w, "DAEMON", "ADDRESS", "REACHABLE", "READY", "VERSION", "SUMMARY")
				for _, s := range rep.Daemons {
					ready, version, summary := "-", "-", s.Summary
					if s.Reachable {
						ready = yesNo(s.Ready)
					}
					if s.Version != nil {
						version = s.Version.Version
					}
					switch {
					case !s.Reachable:
						summary = "unreachable: " + describeNetErr(errors.Unwrap(s.err))
					case !s.Ready:
						summary = "not ready: " + s.NotReady
					}
					row(w, s.Daemon, s.Address, yesNo(s.Reachable), ready, version, summary)
				}
			}); err != nil {
				return err
			}
			return statusExit(cmd.ErrOrStderr(), rep)
		}),
	}
	cmd.Flags().StringSliceVar(&only, "daemons", nil, "daemons to ask: xds, upgrade, agent (default: all)")
	_ = cmd.RegisterFlagCompletionFunc("daemons", cobra.FixedCompletions([]string{"xds", "upgrade", "agent"}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

// statusExit prints why the status is not OK, one line per daemon, and returns its code.
func statusExit(stderr io.Writer, rep statusReport) error {
	var unreachable, unhealthy []string
	for _, s := range rep.Daemons {
		switch {
		case !s.Reachable:
			fmt.Fprintf(stderr, "%v\n", s.err)
			unreachable = append(unreachable, s.Daemon+" at "+s.Address)
		case !s.Healthy || !s.Ready || s.Degraded != "":
			why := s.Degraded
			if !s.Ready {
				why = "not ready: " + s.NotReady
			}
			if !s.Healthy {
				why = "not healthy: " + s.Error
			}
			fmt.Fprintf(stderr, "%s at %s: %s\n", s.Daemon, s.Address, why)
			unhealthy = append(unhealthy, s.Daemon)
		}
	}
	switch {
	case len(unreachable) == len(rep.Daemons):
		return withCode(exitUnreachable, fmt.Errorf("no meshturbo daemon answered (tried %s)", strings.Join(unreachable, ", ")))
	case len(unreachable) > 0:
		return withCode(exitUnreachable, fmt.Errorf("unreachable: %s", strings.Join(unreachable, ", ")))
	case len(unhealthy) > 0:
		return withCode(exitUnhealthy, fmt.Errorf("not healthy: %s", strings.Join(unhealthy, ", ")))
	}
	return nil
}

// probe asks one daemon for its health, readiness, version and summary.
func (g *globals) probe(ctx context.Context, d daemon) daemonStatus {
	s := daemonStatus{Daemon: d.name, Address: d.addr}
	c, err := g.client(ctx, d.short, "")
	if err != nil {
		s.err, s.Error = err, err.Error()
		return s
	}
	code, body, err := c.do(ctx, http.MethodGet, "/healthz", nil, g.timeout)
	if err != nil {
		s.err, s.Error = err, err.Error()
		return s
	}
	s.Reachable = true
	s.Healthy = code == http.StatusOK
	if !s.Healthy {
		s.Error = fmt.Sprintf("/healthz: %d %s", code, strings.TrimSpace(string(body)))
	}
	code, body, err = c.do(ctx, http.MethodGet, "/readyz", nil, g.timeout)
	switch {
	case err != nil:
		s.NotReady = err.Error()
	case code == http.StatusOK:
		s.Ready = true
	default:
		s.NotReady = strings.TrimPrefix(strings.TrimSpace(string(body)), "not ready: ")
	}
	var v admin.VersionInfo
	if _, err := c.getJSON(ctx, "/v1/version", &v); err == nil {
		s.Version = &v
	} else if s.Error == "" && !isRouteMissing(err) { // a daemon older than /v1/version has none
		s.Error = err.Error()
	}
	s.Summary, s.Degraded = g.summary(ctx, c, d.short)
	return s
}

// summary is the one-line view of a daemon's own status, and why it is degraded, if it is.
func (g *globals) summary(ctx context.Context, c *client, short string) (summary, degraded string) {
	switch short {
	case "xds":
		var regs []sourceStatus
		if _, err := c.getJSON(ctx, "/v1/registries", &regs); err != nil {
			return "registries: " + err.Error(), ""
		}
		var names, stale []string
		services := 0
		for _, r := range regs {
			names = append(names, r.Source)
			services += r.Services
			if r.Stale {
				stale = append(stale, r.Source)
			}
		}
		var clients []xdsClient
		_, _ = c.getJSON(ctx, "/v1/xds/clients", &clients)
		summary = fmt.Sprintf("%s (%s), %s, %s", plural(len(regs), "registry"), strings.Join(names, ", "),
			plural(services, "service"), plural(len(clients), "xDS client"))
		if len(stale) > 0 {
			degraded = "stale: " + strings.Join(stale, ", ")
			summary += "; " + degraded
		}
		return summary, degraded
	case "upgrade":
		var st upgradeStatus
		if _, err := c.getJSON(ctx, "/v1/upgrade", &st); err != nil {
			return "upgrade: " + err.Error(), ""
		}
		summary = fmt.Sprintf("envoy %s, epoch %d, %s", st.Version, st.Epoch, st.Phase)
		if st.Last != nil {
			summary += fmt.Sprintf("; last upgrade %s %s ago", st.Last.Outcome, age(g.env.now(), st.Last.Started))
		}
		return summary, ""
	case "agent":
		var st accelStatus
		if _, err := c.getJSON(ctx, "/v1/accel", &st); err != nil {
			return "accel: " + err.Error(), ""
		}
		if !st.Accelerating {
			degraded = "acceleration off: " + st.FallbackReason
			return degraded, degraded
		}
		return fmt.Sprintf("accelerating, %s", plural(st.Sockets, "socket")), ""
	}
	return "", ""
}
