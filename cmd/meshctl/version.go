package main

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/spf13/cobra"

	"github.com/meshturbo/meshturbo/internal/admin"
)

type versionReport struct {
	Client  admin.VersionInfo `json:"client"`
	Daemons []daemonVersion   `json:"daemons,omitempty"`
}

type daemonVersion struct {
	Daemon  string             `json:"daemon"`
	Address string             `json:"address"`
	Version *admin.VersionInfo `json:"version,omitempty"`
	Error   string             `json:"error,omitempty"`

	unreachable bool
}

func newVersionCmd(g *globals) *cobra.Command {
	var clientOnly bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print meshctl's version and the version of every daemon that answers",
		Long: `Print meshctl's version and, unless --client is given, the version each daemon serves
on GET /v1/version. A daemon that does not answer is listed with the reason; the exit code
is still 0, since meshctl's own version is known.`,
		Example: `  meshctl version
  meshctl version --client -o json`,
		Args: argsBetween(0, 0, "no arguments"),
		RunE: run(func(cmd *cobra.Command, _ []string) error {
			rep := versionReport{Client: admin.BuildInfo("meshctl")}
			if !clientOnly {
				ds := knownDaemons()
				rep.Daemons = make([]daemonVersion, len(ds))
				var wg sync.WaitGroup
				for i, d := range ds {
					wg.Go(func() {
						dv := daemonVersion{Daemon: d.name, Address: g.daemons[d.short].addr}
						c, err := g.client(cmd.Context(), d.short, "")
						if err == nil {
							var v admin.VersionInfo
							if _, err = c.getJSON(cmd.Context(), "/v1/version", &v); err == nil {
								dv.Version = &v
							}
						}
						if err != nil {
							var ue *unreachableError
							dv.Error, dv.unreachable = err.Error(), errors.As(err, &ue)
						}
						rep.Daemons[i] = dv
					})
				}
				wg.Wait()
			}
			for _, d := range rep.Daemons {
				if d.Error != "" {
					fmt.Fprintln(cmd.ErrOrStderr(), d.Error)
				}
			}
			return g.render(cmd.OutOrStdout(), rep, func(w io.Writer) {
				row(w, "COMPONENT", "VERSION", "REVISION", "GO", "PLATFORM", "ADDRESS")
				c := rep.Client
				row(w, c.Daemon, c.Version, shortRev(c.Revision), c.GoVersion, c.Platform, "")
				for _, d := range rep.Daemons {
					if v := d.Version; v != nil {
						row(w, d.Daemon, v.Version, shortRev(v.Revision), v.GoVersion, v.Platform, d.Address)
					} else if d.unreachable {
						row(w, d.Daemon, "unreachable", "", "", "", d.Address)
					} else {
						row(w, d.Daemon, "unknown", "", "", "", d.Address)
					}
				}
			})
		}),
	}
	cmd.Flags().BoolVar(&clientOnly, "client", false, "print meshctl's version only; ask no daemon")
	return cmd
}

func shortRev(r string) string {
	if len(r) > 12 {
		return r[:12]
	}
	return r
}
