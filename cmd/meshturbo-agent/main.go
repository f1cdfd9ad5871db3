// Command meshturbo-agent is the node agent: it accelerates TCP between local mesh workloads
// (and between apps and their sidecars on loopback) with sockops + sk_msg, serves the
// counters and state on its admin API, and keeps acceleration up across its own restarts.
// With -vpp-config it also drives VPP's host stack for sidecar-to-sidecar traffic (vpp.go).
//
//	meshturbo-agent [flags]              run
//	meshturbo-agent uninstall [flags]    detach and unpin everything (live pairs drain)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshturbo/meshturbo/bpf"
	"github.com/meshturbo/meshturbo/vpp"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if len(os.Args) > 1 && os.Args[1] == "uninstall" {
		if err := uninstall(os.Args[2:], os.Stdout); err != nil {
			log.Error("meshturbo-agent uninstall failed", "error", err)
			os.Exit(1)
		}
		return
	}
	a, err := parseArgs(os.Args[1:], os.Stderr)
	if err != nil {
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, a, log); err != nil {
		log.Error("meshturbo-agent failed", "error", err)
		os.Exit(1)
	}
}

type args struct {
	cgroup       string
	pinPath      string
	adminAddr    string
	tokenFile    string
	meshIPs      string // comma-separated
	sidecarPorts string // comma-separated
	meshFile     string
	meshPoll     time.Duration
	maxConns     uint
	smallMsg     uint
	smallRun     uint
	queueLimit   uint
	naive        bool
	keepDemoted  bool
	coexist      bool
	// The iptables-free redirection mode (see bpf.RedirectConfig).
	redirect         bool
	redirectOutbound string
	redirectSidecars string // comma-separated cgroup v2 directories
	redirectExclPort string // comma-separated
	redirectExclCIDR string // comma-separated
	// VPP mode (vpp.go): on when vppConfig is set.
	vppConfig    string
	vppAPISocket string
	vppOpts      []vpp.Option // tests: a fake VPP's stats segment
	// probeFailure forces a feature probe to fail (tests of the fallback path).
	probeFailure bpf.Feature
}

func parseArgs(argv []string, stderr io.Writer) (args, error) {
	var a args
	fs := flag.NewFlagSet("meshturbo-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&a.cgroup, "cgroup", defaultCgroup(), "cgroup v2 directory whose sockets are accelerated")
	fs.StringVar(&a.pinPath, "pin-path", bpf.DefaultPinPath, "bpffs directory of the pinned maps and links")
	fs.StringVar(&a.adminAddr, "admin", "127.0.0.1:15055", "admin API address: loopback host:port or unix:///path; elsewhere it needs -admin-token-file")
	fs.StringVar(&a.tokenFile, "admin-token-file", "", "file with the admin API bearer token")
	fs.StringVar(&a.meshIPs, "mesh-ips", "", "comma-separated local IPs of mesh workloads")
	fs.StringVar(&a.sidecarPorts, "sidecar-ports", "15001,15006", "comma-separated sidecar ports (loopback pairs with one end on one are accelerated)")
	fs.StringVar(&a.meshFile, "mesh-file", "", `JSON file {"ips": [...], "sidecar_ports": [...], "pods": [{"uid": ..., "name": ...}]} (e.g. written by the CNI integration; pods: VPP mode's sidecars); replaces -mesh-ips/-sidecar-ports, re-read when it changes and on SIGHUP`)
	fs.StringVar(&a.vppConfig, "vpp-config", "", "VPP mode: YAML file with the node's VPP state (uplink VF, addresses, routes, hand-off directory); sidecars come from the mesh file's \"pods\" (see vpp/README.md)")
	fs.StringVar(&a.vppAPISocket, "vpp-api-socket", "", "with -vpp-config: VPP's binary API socket, overriding the file's apiSocket (default /run/vpp/api.sock)")
	fs.DurationVar(&a.meshPoll, "mesh-poll", 2*time.Second, "how often -mesh-file is checked for changes")
	fs.UintVar(&a.maxConns, "max-conns", bpf.DefaultMaxConns, "sockhash size (accelerated sockets, two per connection)")
	fs.UintVar(&a.smallMsg, "small-msg", bpf.DefaultSmallMsg, "sends below this many bytes are small (see -small-run): a socket that streams small writes runs as plain TCP, which coalesces them; 0 turns the small-write rule off")
	fs.UintVar(&a.smallRun, "small-run", bpf.DefaultSmallRun, "a socket making this many small sends in a row, with no send of its peer between, moves to TCP for good")
	fs.UintVar(&a.queueLimit, "queue-limit", bpf.DefaultQueueLimit, "bytes a socket may hold unread from redirects; a pair reaching it moves to TCP (flow control) for good")
	fs.BoolVar(&a.naive, "naive-redirect", false, "redirect every send of a mesh socket (no small-write rule); for benchmarks")
	fs.BoolVar(&a.keepDemoted, "keep-demoted", false, "leave sockets moved to TCP in the sockhash instead of unhooking them; for benchmarks")
	fs.BoolVar(&a.coexist, "coexist-with-other-owners", false, "run beside another sockmap owner on the cgroup (Cilium, Merbridge, another agent) instead of refusing; the sockets it holds stay its own, counted as insert_failed{reason=\"busy\"}")
	fs.BoolVar(&a.redirect, "redirect", false, "iptables-free redirection: send apps' TCP connects to the sidecar's outbound port (cgroup/connect4) and answer SO_ORIGINAL_DST for the sidecar (cgroup/getsockopt); off: iptables does it")
	fs.StringVar(&a.redirectOutbound, "redirect-outbound", "127.0.0.1:15001", "with -redirect: the sidecar's outbound listener")
	fs.StringVar(&a.redirectSidecars, "redirect-sidecar-cgroups", "", "with -redirect (required): comma-separated cgroup v2 directories of sidecar processes, whose own connects are never redirected")
	fs.StringVar(&a.redirectExclPort, "redirect-exclude-ports", "", "with -redirect: comma-separated destination ports never redirected")
	fs.StringVar(&a.redirectExclCIDR, "redirect-exclude-cidrs", "", "with -redirect: comma-separated destination IPv4 CIDRs never redirected")
	if err := fs.Parse(argv); err != nil {
		return args{}, err
	}
	for name, v := range map[string]uint{"max-conns": a.maxConns, "small-msg": a.smallMsg, "small-run": a.smallRun, "queue-limit": a.queueLimit} {
		if v > 1<<30 {
			fmt.Fprintf(stderr, "meshturbo-agent: -%s %d is too large\n", name, v)
			return args{}, errors.New("value too large")
		}
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshturbo-agent: unexpected arguments %q\n", fs.Args())
		return args{}, errors.New("unexpected arguments")
	}
	return a, nil
}

// defaultCgroup is the cgroup v2 root: /sys/fs/cgroup on unified hosts, else the hybrid
// layout's /sys/fs/cgroup/unified.
func defaultCgroup() string {
	if isCgroup2("/sys/fs/cgroup") {
		return "/sys/fs/cgroup"
	}
	return "/sys/fs/cgroup/unified"
}

func uninstall(argv []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("meshturbo-agent uninstall", flag.ContinueOnError)
	pinPath := fs.String("pin-path", bpf.DefaultPinPath, "bpffs directory of the pinned maps and links")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	if err := bpf.Uninstall(*pinPath); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "meshturbo-agent: uninstalled %s: programs detached, pins removed; "+
		"connections accelerated so far keep working until they close\n", *pinPath)
	return nil
}
