package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newAccelCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "accel",
		Short: "Show the node agent's socket acceleration (eBPF sockops + sk_msg)",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show whether sockets are accelerated, the attached programs, and the byte counters",
		Long: `Show meshturbo-agent's acceleration: whether it is on (and, if not, the kernel feature
that is missing — traffic then takes the normal TCP path), the attached programs, how many
sockets are accelerated, and how many bytes were redirected socket-to-socket or took TCP.

Exit code 5 when acceleration is off.`,
		Example: `  meshctl accel status
  meshctl accel status --agent-admin 10.0.3.7:15055 --token-file ./admin-token -o json`,
		Args: argsBetween(0, 0, "no arguments"),
		RunE: run(func(cmd *cobra.Command, _ []string) error {
			c, err := g.client(cmd.Context(), "agent", "")
			if err != nil {
				return err
			}
			var st accelStatus
			raw, err := c.getJSON(cmd.Context(), "/v1/accel", &st)
			if err != nil {
				return err
			}
			if err := g.render(cmd.OutOrStdout(), raw, func(w io.Writer) { describeAccel(w, st) }); err != nil {
				return err
			}
			if !st.Accelerating {
				return withCode(exitUnhealthy, fmt.Errorf("meshturbo-agent at %s: acceleration is off: %s", c.d.addr, st.FallbackReason))
			}
			return nil
		}),
	})
	return cmd
}

func describeAccel(w io.Writer, st accelStatus) {
	field(w, "Accelerating", yesNo(st.Accelerating))
	if !st.Accelerating {
		field(w, "Fallback reason", st.FallbackReason)
	}
	if s := st.State; s != nil {
		field(w, "Cgroup", s.CgroupPath)
		field(w, "Pin path", s.PinPath)
		field(w, "Mesh IPs", strings.Join(s.MeshIPs, ","))
		var ports []string
		for _, p := range s.SidecarPorts {
			ports = append(ports, fmt.Sprint(p))
		}
		field(w, "Sidecar ports", strings.Join(ports, ","))
		small := "off"
		if s.SmallMsg > 0 {
			small = fmt.Sprintf("%d sends below %d bytes in a row move a socket to TCP", s.SmallRun, s.SmallMsg)
		}
		field(w, "Small-write rule", small)
		bound := "none"
		if s.QueueLimit > 0 {
			bound = bytesHuman(uint64(s.QueueLimit)) + " unread per socket, then TCP's flow control"
		}
		field(w, "Queue bound", bound)
		field(w, "Unhooking", onOff(s.Unhook.On, s.Unhook.Off, fmt.Sprintf("on (%d waiting)", s.Unhook.Deferred)))
		field(w, "Listeners at start", onOff(s.Listeners.On, s.Listeners.Off, fmt.Sprintf("%d recorded", s.Listeners.Seeded)))
		redirect := "not configured"
		if s.Redirect.On || s.Redirect.Off != "" {
			redirect = onOff(s.Redirect.On, s.Redirect.Off, "on: connects go to "+s.Redirect.SidecarAddr)
		}
		field(w, "Redirect mode", redirect)
		for _, m := range s.ReplacedMaps {
			field(w, "Replaced map", m.Name+": "+m.Reason)
		}
	}
	if st.Accelerating {
		field(w, "Accelerated sockets", st.Sockets)
	}
	if s := st.Stats; s != nil {
		field(w, "Redirected", fmt.Sprintf("%s in %d sends", bytesHuman(s.BytesRedirected), s.MsgRedirected))
		field(w, "Fell through to TCP", fmt.Sprintf("%s in %d sends (peer not accelerated)", bytesHuman(s.BytesFallthrough), s.MsgFallthrough))
		field(w, "Kept on TCP", fmt.Sprintf("%s in %d sends", bytesHuman(s.BytesTCPOnly), s.MsgTCPOnly))
		field(w, "Pairs moved to TCP", fmt.Sprintf("%d (%d for a blocking end, %d with an unreadable queue); %d sockets unhooked",
			s.SocketsDemoted, s.BlockingDemoted, s.QueueUnknown, s.SocketsUnhooked))
		field(w, "Queue back-offs", fmt.Sprintf("%d (%d resumed redirecting)", s.QueueBackoff, s.QueueResumed))
		field(w, "Sockets inserted", s.SocketsInserted)
		field(w, "Kept out", fmt.Sprintf("%d blocking, %d without their connecting end", s.BlockingSkipped, s.Unpaired))
		field(w, "Insert failures", fmt.Sprintf("%d (busy %d, full %d, state %d)", s.InsertFailed, s.InsertBusy, s.InsertFull, s.StateFailed))
		if st.State != nil && st.State.Redirect.On {
			field(w, "Connects redirected", fmt.Sprintf("%d (left alone: %d by the sidecar, %d excluded); SO_ORIGINAL_DST answered %d",
				s.ConnectRedirected, s.ConnectSidecar, s.ConnectExcluded, s.OrigDstAnswered))
		}
	}
	field(w, "Error", st.Error)
	if s := st.State; s != nil && len(s.Programs) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Programs (%d):\n", len(s.Programs))
		row(w, "  PROGRAM", "HOOK", "PROGRAM ID", "LINK ID", "ADOPTED", "PIN")
		for _, p := range s.Programs {
			row(w, "  "+p.Program, p.Hook, p.ProgramID, p.LinkID, yesNo(p.Adopted), p.LinkPin)
		}
	}
	features := st.Features
	if len(features) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Kernel features (%d):\n", len(features))
		row(w, "  FEATURE", "SUPPORTED", "ERROR")
		for _, f := range features {
			row(w, "  "+f.Feature, yesNo(f.Supported), f.Error)
		}
	}
}

// onOff renders a mode: on (what it does), or off and why.
func onOff(on bool, off, onText string) string {
	if on {
		return onText
	}
	if off == "" {
		return "off"
	}
	return "off: " + off
}

func newVPPCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vpp",
		Short: "Show the node agent's VPP state (user-space stack over SR-IOV)",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show the agent's VPP connection, uplink interface and app namespaces",
		Long: `Show the VPP state of meshturbo-agent (GET /v1/vpp): whether it is connected to VPP and
its version (or why not), the SR-IOV uplink it owns with its counters, the app namespaces
of the sidecars, and the outcome of the last apply.

Exit code 4 when the agent does not run VPP, 5 when it is not connected or gave up.`,
		Example: `  meshctl vpp status
  meshctl vpp status -o yaml`,
		Args: argsBetween(0, 0, "no arguments"),
		RunE: run(func(cmd *cobra.Command, _ []string) error {
			c, err := g.client(cmd.Context(), "agent", "")
			if err != nil {
				return err
			}
			var st vppStatus
			raw, err := c.getJSON(cmd.Context(), "/v1/vpp", &st)
			if isNotFound(err) {
				return withCode(exitNotFound, fmt.Errorf("the agent at %s does not run VPP (404 on GET /v1/vpp); "+
					"start meshturbo-agent with VPP enabled on a node with VPP", c.d.addr))
			}
			if err != nil {
				return err
			}
			now := g.env.now()
			if err := g.render(cmd.OutOrStdout(), raw, func(w io.Writer) { describeVPP(w, st, now) }); err != nil {
				return err
			}
			switch {
			case st.Fatal != "":
				return withCode(exitUnhealthy, fmt.Errorf("meshturbo-agent at %s gave up on VPP: %s", c.d.addr, st.Fatal))
			case !st.Connected && st.ConnectError != "":
				return withCode(exitUnhealthy, fmt.Errorf("meshturbo-agent at %s is not connected to VPP: %s", c.d.addr, st.ConnectError))
			case !st.Connected:
				return withCode(exitUnhealthy, fmt.Errorf("meshturbo-agent at %s is not connected to VPP", c.d.addr))
			}
			return nil
		}),
	})
	return cmd
}

func describeVPP(w io.Writer, st vppStatus, now time.Time) {
	field(w, "Connected", yesNo(st.Connected))
	field(w, "API socket", st.APISocket)
	if !st.Connected {
		field(w, "Connect error", st.ConnectError)
	}
	field(w, "VPP version", st.Version)
	field(w, "Connections", st.Connects)
	if u := st.Uplink; u != nil {
		field(w, "Uplink", fmt.Sprintf("%s (sw_if_index %d, driver %s, device %s)", u.Name, u.SwIfIndex, u.Driver, u.Device))
	} else {
		field(w, "Uplink", "")
	}
	field(w, "Sidecars", st.Sidecars)
	field(w, "App namespaces", strings.Join(st.Namespaces, ","))
	field(w, "Hand-off dir", st.HandoffDir)
	field(w, "Last apply", ago(now, st.LastApply))
	field(w, "Last apply error", st.LastApplyError)
	field(w, "Stats error", st.StatsError)
	field(w, "Mesh error", st.MeshError)
	field(w, "Fatal", st.Fatal)
	if len(st.Interfaces) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Interfaces (%d):\n", len(st.Interfaces))
		row(w, "  INTERFACE", "SW_IF_INDEX", "RX PACKETS", "RX BYTES", "TX PACKETS", "TX BYTES", "DROPS", "RX ERRORS", "TX ERRORS")
		for _, i := range st.Interfaces {
			row(w, "  "+i.Name, i.SwIfIndex, i.RxPackets, bytesHuman(i.RxBytes), i.TxPackets, bytesHuman(i.TxBytes), i.Drops, i.RxErrors, i.TxErrors)
		}
	}
}
