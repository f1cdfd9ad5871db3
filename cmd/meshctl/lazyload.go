package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newLazyloadCmd(g *globals) *cobra.Command {
	var namespace string
	cmd := &cobra.Command{
		Use:     "lazyload",
		Aliases: []string{"ll"},
		Short:   "Show what lazy loading learned: call edges and the scope of each workload",
		Long: `Show what meshturbo-xds's lazy loading learned from access logs: the edges (workload →
host:port) each workload called, and the scope built from them (the Istio Sidecar that trims
the workload's config to what it calls). A workload is <namespace>/<name>, or <name> with
--namespace.`,
	}
	cmd.PersistentFlags().StringVarP(&namespace, "namespace", "n", "default", "namespace of a workload given without one")

	edges := &cobra.Command{
		Use:   "edges [<workload>]",
		Short: "List learned and static call edges, of one workload or all",
		Example: `  meshctl lazyload edges
  meshctl lazyload edges default/client
  meshctl lazyload edges client -n shop -o json`,
		Args:              argsBetween(0, 1, "at most one workload"),
		ValidArgsFunction: g.completeWorkload,
		RunE: run(func(cmd *cobra.Command, args []string) error {
			c, err := g.client(cmd.Context(), "xds", "")
			if err != nil {
				return err
			}
			path := "/v1/lazyload/edges"
			if len(args) == 1 {
				wl, err := workloadArg(args[0], namespace)
				if err != nil {
					return err
				}
				path += "?workload=" + url.QueryEscape(wl)
			}
			var list edgeList
			raw, err := c.getJSON(cmd.Context(), path, &list)
			if err != nil {
				return lazyloadErr(c, err)
			}
			now := g.env.now()
			return g.render(cmd.OutOrStdout(), raw, func(w io.Writer) {
				row(w, "WORKLOAD", "HOST", "PORT", "PROTOCOL", "ORIGIN", "HITS", "FIRST SEEN", "LAST SEEN", "EXPIRES IN")
				for _, e := range list.Edges {
					expires := until(now, e.Expires)
					if e.Expires.IsZero() {
						expires = "never"
					}
					row(w, e.Workload, e.Host, e.Port, e.Protocol, e.Origin, e.Hits, age(now, e.FirstSeen), age(now, e.LastSeen), expires)
				}
			})
		}),
	}

	scopeCmd := &cobra.Command{
		Use:   "scope [<workload>]",
		Short: "Show the scope lazy loading built for a workload, or list every scope",
		Example: `  meshctl lazyload scope default/client
  meshctl lazyload scope client -n default -o yaml
  meshctl lazyload scope            # every workload's scope`,
		Args:              argsBetween(0, 1, "at most one workload"),
		ValidArgsFunction: g.completeWorkload,
		RunE: run(func(cmd *cobra.Command, args []string) error {
			c, err := g.client(cmd.Context(), "xds", "")
			if err != nil {
				return err
			}
			if len(args) == 0 {
				var list scopeList
				raw, err := c.getJSON(cmd.Context(), "/v1/lazyload/scopes", &list)
				if err != nil {
					return lazyloadErr(c, err)
				}
				return g.render(cmd.OutOrStdout(), raw, func(w io.Writer) {
					row(w, "WORKLOAD", "SELECTOR", "HOSTS", "FALLBACK HITS", "VERSION")
					for _, s := range list.Scopes {
						row(w, s.Workload, labels(s.Selector), len(s.Hosts), s.FallbackHits, shortRev(s.Version))
					}
				})
			}
			wl, err := workloadArg(args[0], namespace)
			if err != nil {
				return err
			}
			ns, name, _ := strings.Cut(wl, "/")
			var s scope
			raw, err := c.getJSON(cmd.Context(), "/v1/lazyload/scopes/"+url.PathEscape(ns)+"/"+url.PathEscape(name), &s)
			if err != nil {
				if isNotFound(err) && !isRouteMissing(err) {
					var he *httpError
					errors.As(err, &he)
					return withCode(exitNotFound, fmt.Errorf("meshturbo-xds at %s has no lazyload scope for workload %s: %s "+
						"(a workload gets one once it has a sidecar and has called through the fallback; list them with meshctl lazyload scope)",
						c.d.addr, wl, he.msg))
				}
				return lazyloadErr(c, err)
			}
			return g.render(cmd.OutOrStdout(), raw, func(w io.Writer) {
				field(w, "Workload", s.Workload)
				field(w, "Namespace", s.Namespace)
				field(w, "Selector", labels(s.Selector))
				field(w, "Version", s.Version)
				field(w, "Fallback hits", s.FallbackHits)
				fmt.Fprintln(w)
				fmt.Fprintf(w, "Hosts (%d):\n", len(s.Hosts))
				for _, h := range s.Hosts {
					fmt.Fprintf(w, "  %s\n", h)
				}
			})
		}),
	}
	cmd.AddCommand(edges, scopeCmd)
	return cmd
}

// workloadArg returns <namespace>/<name> for "ns/name" or "name" (with the --namespace flag).
func workloadArg(arg, namespace string) (string, error) {
	ns, name, ok := strings.Cut(arg, "/")
	if !ok {
		ns, name = namespace, arg
	}
	if ns == "" || name == "" || strings.Contains(name, "/") {
		return "", usageErr("workload %q: want <namespace>/<name>, or <name> with --namespace", arg)
	}
	return ns + "/" + name, nil
}

// lazyloadErr turns a missing route into "this meshturbo-xds has no lazy loading".
func lazyloadErr(c *client, err error) error {
	if isRouteMissing(err) {
		return withCode(exitNotFound, fmt.Errorf("meshturbo-xds at %s does not serve lazy loading (%v); "+
			"it needs a meshturbo-xds built with lazy loading", c.d.addr, err))
	}
	return err
}

// completeWorkload completes workloads that have a scope.
func (g *globals) completeWorkload(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	c, err := g.client(cmd.Context(), "xds", "")
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Second)
	defer cancel()
	var list scopeList
	if _, err := c.getJSON(ctx, "/v1/lazyload/scopes", &list); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []string
	for _, s := range list.Scopes {
		out = append(out, s.Workload)
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
