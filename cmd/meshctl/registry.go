package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newRegistryCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "registry",
		Aliases: []string{"registries", "reg"},
		Short:   "Show the registries meshturbo-xds bridges (Consul, ZooKeeper, Eureka)",
		Long: `Show the registries meshturbo-xds bridges into Istio: whether each is synced or stale
(a registry that stops answering keeps its last snapshot and is marked stale), its services
and endpoints, and the entries it skipped with the reason.`,
	}
	cmd.AddCommand(newRegistryListCmd(g), newRegistryGetCmd(g))
	return cmd
}

func newRegistryListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the bridged registries with their sync state",
		Example: `  meshctl registry list
  meshctl registry list -o json | jq '.[] | select(.stale)'`,
		Args: argsBetween(0, 0, "no arguments"),
		RunE: run(func(cmd *cobra.Command, _ []string) error {
			c, err := g.client(cmd.Context(), "xds", "")
			if err != nil {
				return err
			}
			var regs []sourceStatus
			raw, err := c.getJSON(cmd.Context(), "/v1/registries", &regs)
			if err != nil {
				return err
			}
			now := g.env.now()
			return g.render(cmd.OutOrStdout(), raw, func(w io.Writer) {
				row(w, "REGISTRY", "SYNCED", "STALE", "SERVICES", "ENDPOINTS", "SKIPPED", "LAST SYNC", "LAST CONTACT", "LAST ERROR")
				for _, r := range regs {
					row(w, r.Source, yesNo(r.Synced), yesNo(r.Stale), r.Services, r.Endpoints, len(r.Skipped),
						age(now, r.LastSync), age(now, r.LastContact), r.LastError)
				}
			})
		}),
	}
}

// registryView is what registry get shows for one registry.
type registryView struct {
	Registry json.RawMessage   `json:"registry"`
	Services []json.RawMessage `json:"services"`
}

func newRegistryGetCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "get <registry> [<host>]",
		Short: "Show one registry with its services, endpoints and skipped entries, or one service",
		Long: `Show one registry: its sync state, the services it contributes to the catalog with their
ports and endpoints, and the entries it skipped with the reason. With a host name, show that
service in full: ports, and every endpoint with its address, ports, labels and whether it is
meshed (meshed endpoints get mTLS).`,
		Example: `  meshctl registry get consul
  meshctl registry get zookeeper org.example.greeter.dubbo -o yaml`,
		Args:              argsBetween(1, 2, "a registry name and optionally a host name"),
		ValidArgsFunction: g.completeRegistry,
		RunE: run(func(cmd *cobra.Command, args []string) error {
			c, err := g.client(cmd.Context(), "xds", "")
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			var regs []sourceStatus
			rawRegs, err := c.getJSON(ctx, "/v1/registries", &regs)
			if err != nil {
				return err
			}
			var raws []json.RawMessage
			if err := json.Unmarshal(rawRegs, &raws); err != nil || len(raws) != len(regs) {
				return fmt.Errorf("/v1/registries: not a JSON list")
			}
			i := slices.IndexFunc(regs, func(r sourceStatus) bool { return r.Source == args[0] })
			if i < 0 {
				var names []string
				for _, r := range regs {
					names = append(names, r.Source)
				}
				return withCode(exitNotFound, fmt.Errorf("meshturbo-xds at %s bridges no registry %q (it bridges: %s)",
					c.d.addr, args[0], strings.Join(names, ", ")))
			}
			reg := regs[i]
			svcs, rawSvcs, err := servicesOf(ctx, c, reg.Source)
			if err != nil {
				return err
			}
			now := g.env.now()
			if len(args) == 2 {
				j := slices.IndexFunc(svcs, func(s service) bool { return s.Hostname == args[1] })
				if j < 0 {
					return withCode(exitNotFound, fmt.Errorf("registry %s has no service %q in the catalog of meshturbo-xds at %s%s",
						reg.Source, args[1], c.d.addr, skippedHint(reg, args[1])))
				}
				return g.render(cmd.OutOrStdout(), rawSvcs[j], func(w io.Writer) { describeService(w, svcs[j]) })
			}
			view := registryView{Registry: raws[i], Services: rawSvcs}
			return g.render(cmd.OutOrStdout(), view, func(w io.Writer) { describeRegistry(w, now, reg, svcs) })
		}),
	}
}

// servicesOf returns the catalog's services whose source is src, decoded and raw.
func servicesOf(ctx context.Context, c *client, src string) ([]service, []json.RawMessage, error) {
	body, err := c.get(ctx, "/v1/services")
	if err != nil {
		return nil, nil, err
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(body, &raws); err != nil {
		return nil, nil, fmt.Errorf("/v1/services: not a JSON list: %w", err)
	}
	svcs := []service{}
	out := []json.RawMessage{}
	for _, r := range raws {
		var s service
		if err := json.Unmarshal(r, &s); err != nil {
			return nil, nil, fmt.Errorf("/v1/services: %w", err)
		}
		if s.Source == src {
			svcs = append(svcs, s)
			out = append(out, r)
		}
	}
	return svcs, out, nil
}

func skippedHint(reg sourceStatus, host string) string {
	for _, s := range reg.Skipped {
		if s.Hostname == host && s.ID == "" {
			return fmt.Sprintf(": it was skipped (%s: %s)", s.Code, s.Reason)
		}
	}
	return ""
}

func describeRegistry(w io.Writer, now time.Time, r sourceStatus, svcs []service) {
	field(w, "Registry", r.Source)
	field(w, "Synced", yesNo(r.Synced))
	field(w, "Stale", yesNo(r.Stale))
	field(w, "Last sync", ago(now, r.LastSync))
	field(w, "Last contact", ago(now, r.LastContact))
	if r.SyncLatency > 0 {
		field(w, "Sync latency", time.Duration(r.SyncLatency).Round(time.Millisecond))
	}
	field(w, "Last error", r.LastError)
	field(w, "Services", r.Services)
	field(w, "Endpoints", r.Endpoints)
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Services in the catalog (%d):\n", len(svcs))
	if len(svcs) > 0 {
		row(w, "  HOST", "NAMESPACE", "PORTS", "ENDPOINTS", "MESHED")
		for _, s := range svcs {
			meshed := 0
			for _, e := range s.Endpoints {
				if e.Meshed {
					meshed++
				}
			}
			row(w, "  "+s.Hostname, s.Namespace, portsString(s.Ports), len(s.Endpoints), meshed)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Skipped (%d):\n", len(r.Skipped))
	if len(r.Skipped) > 0 {
		row(w, "  HOST", "INSTANCE", "CODE", "REASON")
		for _, s := range r.Skipped {
			row(w, "  "+s.Hostname, s.ID, s.Code, s.Reason)
		}
	}
}

func describeService(w io.Writer, s service) {
	field(w, "Host", s.Hostname)
	field(w, "Namespace", s.Namespace)
	field(w, "Registry", s.Source)
	field(w, "Labels", labels(s.Labels))
	field(w, "Ports", portsString(s.Ports))
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Endpoints (%d):\n", len(s.Endpoints))
	if len(s.Endpoints) > 0 {
		row(w, "  ID", "ADDRESS", "PORTS", "MESHED", "LOCALITY", "WEIGHT", "LABELS")
		for _, e := range s.Endpoints {
			var ports []string
			for _, name := range sortedKeys(e.Ports) {
				ports = append(ports, fmt.Sprintf("%s=%d", name, e.Ports[name]))
			}
			weight := ""
			if e.Weight > 0 {
				weight = fmt.Sprint(e.Weight)
			}
			row(w, "  "+e.ID, e.Address, strings.Join(ports, ","), yesNo(e.Meshed), e.Locality, weight, labels(e.Labels))
		}
	}
}

func portsString(ps []servicePort) string {
	var out []string
	for _, p := range ps {
		out = append(out, fmt.Sprintf("%d/%s", p.Number, p.Protocol))
	}
	return strings.Join(out, ",")
}

// ago is age with " ago", for describe views.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return age(now, t) + " ago"
}

// completeRegistry completes registry names (and then host names) from meshturbo-xds.
func (g *globals) completeRegistry(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	c, err := g.client(cmd.Context(), "xds", "")
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Second)
	defer cancel()
	switch len(args) {
	case 0:
		var regs []sourceStatus
		if _, err := c.getJSON(ctx, "/v1/registries", &regs); err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []string
		for _, r := range regs {
			out = append(out, r.Source)
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	case 1:
		svcs, _, err := servicesOf(ctx, c, args[0])
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []string
		for _, s := range svcs {
			out = append(out, s.Hostname)
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	}
	return nil, cobra.ShellCompDirectiveNoFileComp
}
