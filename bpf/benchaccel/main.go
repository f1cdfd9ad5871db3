// Command benchaccel measures plain loopback TCP against meshturbo's sockops + sk_msg
// acceleration with real tools (sockperf, iperf3), both ends in one test cgroup, runs
// interleaved (plain, accel, accel, plain, ...) and reports medians. Needs root. Run it
// with `make bench-accel` (go run ./bpf/benchaccel).
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/meshturbo/meshturbo/bpf"
)

type opts struct {
	reps                int
	duration            time.Duration
	smallStreamDuration time.Duration
	smallMsg            uint
	cgroup2             string
	jsonOut             string
	only                string
	modes               string
	keepAwake           bool
	pinCPUs             string
	// envoyConns is fortio's connection count in the Envoy runs.
	envoyConns int
}

func main() {
	var o opts
	flag.IntVar(&o.reps, "reps", 3, "repetitions of every case in each mode (interleaved)")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of one tool run")
	flag.DurationVar(&o.smallStreamDuration, "small-stream-duration", 10*time.Second,
		"length of one run of the Go harness's small-write streams (their rate swings most on a small VM: longer runs average the swings)")
	flag.StringVar(&o.cgroup2, "cgroup2", "/sys/fs/cgroup/unified", "cgroup v2 mount to make the bench cgroup in")
	flag.StringVar(&o.jsonOut, "json", "", "also write all samples as JSON to this file")
	flag.StringVar(&o.only, "only", "", "comma-separated runs to do (default all): "+strings.Join(runNames(), ",")+",envoy")
	flag.IntVar(&o.envoyConns, "envoy-conns", 8, "fortio connections in the Envoy runs")
	flag.UintVar(&o.smallMsg, "small-msg", uint(bpf.DefaultSmallMsg), "the agent's small-write threshold in the accelerated modes (0: the rule off; default: the agent's)")
	flag.StringVar(&o.pinCPUs, "pin-cpus", "", "CLIENT,SERVER (e.g. 0,1): run the tools' clients and servers on these CPUs in every mode;"+
		" empty (the default): where the scheduler puts them, as on a node. Pinned apart, every wake-up crosses CPUs: Go ping-pong"+
		" p50 doubled here (10 → 20 µs) and its ratio rose to ~0.89×, while bulk and small streams gained; iperf3 16 KiB swung as much either way")
	flag.BoolVar(&o.keepAwake, "keep-awake", true, "keep every CPU out of idle with SCHED_IDLE spinners during the ping-pong runs (see awake.go)")
	flag.StringVar(&o.modes, "modes", strings.Join(defaultModes, ","), "comma-separated modes to compare ("+strings.Join(allModes, ",")+"); plain is the baseline")
	serve := flag.String("go-serve", "", "internal: run the Go harness server on this address")
	client := flag.String("go-client", "", "internal: run one Go harness client against this address for -duration")
	victim := flag.String("go-victim", "", "internal: the Go harness server's address outside the mesh (flood's victim)")
	op := flag.String("go-op", "", "internal: the Go harness client's case (pingpong, stream, fill, flood)")
	size := flag.Int("go-size", 0, "internal: the Go harness client's message size")
	flag.Parse()
	switch {
	case *serve != "":
		if err := goServe(strings.Split(*serve, ",")); err != nil {
			fmt.Fprintln(os.Stderr, "go harness server:", err)
			os.Exit(1)
		}
		return
	case *client != "":
		if err := goClient(*client, *victim, *op, *size, o.duration); err != nil {
			fmt.Fprintln(os.Stderr, "go harness client:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-accel:", err)
		os.Exit(1)
	}
}

// A run is one tool invocation; it yields one or more metrics.
type benchRun struct {
	name    string
	metrics []metric
	run     func(ctx context.Context, b *bench) (map[string]float64, error)
}

// agentOnly names the runs that measure the agent's programs themselves: they are not run in
// plain mode, and are reported naive against ours, after the table.
var agentOnly = map[string]bool{"verdict": true}

// A metric is one reported number; higher is better unless lowerBetter.
type metric struct {
	name        string
	unit        string
	lowerBetter bool
	throughput  bool // counts for worst_ratio
}

type bench struct {
	o            opts
	cgroup       string
	sockperfPort uint16
	iperfPort    uint16
	goAddr       string // the Go harness server, a mesh port
	goVictimAddr string // the same server on a port outside the mesh
	cgroupFD     *os.File
	// clientCPU and serverCPU pin the tools (-pin-cpus); empty: not pinned.
	clientCPU, serverCPU string
}

func runs() []benchRun {
	rate := func(name string, size int) benchRun {
		return benchRun{name, []metric{{name, "msg/s", false, true}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			v, err := b.sockperfThroughput(ctx, size)
			return map[string]float64{name: v}, err
		}}
	}
	iperf := func(name, length string) benchRun {
		return benchRun{name, []metric{{name, "Gbit/s", false, true}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			v, err := b.iperf(ctx, length)
			return map[string]float64{name: v}, err
		}}
	}
	goStream := func(name string, size int, unit string, per int) benchRun {
		return benchRun{name, []metric{{name, unit, false, true}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			d := b.o.duration
			if per > 0 {
				d = b.o.smallStreamDuration
			}
			r, err := b.goRunFor(ctx, "stream", size, d)
			if per == 0 {
				return map[string]float64{name: r["rate"] * 8 / 1e9}, err
			}
			return map[string]float64{name: r["rate"] / float64(per)}, err
		}}
	}
	return []benchRun{
		{"pingpong_64B", []metric{{"pingpong_64B_p50", "usec one-way", true, false}, {"pingpong_64B_p99", "usec one-way", true, false}},
			func(ctx context.Context, b *bench) (map[string]float64, error) {
				p, err := b.sockperfPingPong(ctx, 64)
				return map[string]float64{"pingpong_64B_p50": p["50.000"], "pingpong_64B_p99": p["99.000"]}, err
			}},
		rate("stream_64B", 64),
		rate("stream_1KiB", 1024),
		iperf("iperf3_1KiB", "1K"),
		iperf("iperf3_16KiB", "16K"),
		iperf("iperf3_128KiB", "128K"),
		{"go_pingpong_64B", []metric{{"go_pingpong_64B_p50", "usec one-way", true, false}, {"go_pingpong_64B_p99", "usec one-way", true, false}},
			func(ctx context.Context, b *bench) (map[string]float64, error) {
				p, err := b.goRun(ctx, "pingpong", 64)
				return map[string]float64{"go_pingpong_64B_p50": p["p50"], "go_pingpong_64B_p99": p["p99"]}, err
			}},
		goStream("go_stream_64B", 64, "msg/s", 64),
		goStream("go_stream_1KiB", 1024, "msg/s", 1024),
		goStream("bulk_128KiB", 128<<10, "Gbit/s", 0),
		{"queue", []metric{{"queue_bytes", "bytes", true, false}, {"queue_enomem", "ENOMEM", true, false}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			r, err := b.goRun(ctx, "fill", 0)
			return map[string]float64{"queue_bytes": r["queued"], "queue_enomem": r["enomem"]}, err
		}},
		{"flood", []metric{{"victim_tput", "during ÷ before", false, false}, {"victim_p99", "during ÷ before", true, false},
			{"flood_enomem", "ENOMEM of 8", true, false}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			r, err := b.goRun(ctx, "flood", 0)
			return map[string]float64{"victim_tput": r["ratio"], "victim_p99": r["p99_ratio"], "flood_enomem": r["enomem"]}, err
		}},
		{"verdict", []metric{{"verdict_ns", "ns per send", true, false}}, func(ctx context.Context, b *bench) (map[string]float64, error) {
			ns, err := b.verdictCost(ctx)
			return map[string]float64{"verdict_ns": ns}, err
		}},
	}
}

// Modes: plain TCP, naive redirect (every send), ours (the agent's defaults), control (plain
// TCP again, last in each rep's order, so plain and control run at the two ends of it: their
// ratio is what this machine's swing alone makes of a case), and ours with demoted sockets
// left in the sockhash (not run by default: what unhooking gains).
var allModes = []string{"plain", "naive", "accel", "control", "keep"}

var defaultModes = []string{"plain", "naive", "accel", "control"}

// noAgent says whether a mode runs without the agent.
func noAgent(mode string) bool { return mode == "plain" || mode == "control" }

func runNames() []string {
	var names []string
	for _, r := range runs() {
		names = append(names, r.name)
	}
	return names
}

func (o opts) selected() []benchRun {
	if o.only == "" {
		return runs()
	}
	want := splitList(o.only)
	var out []benchRun
	for _, r := range runs() {
		if slices.Contains(want, r.name) {
			out = append(out, r)
		}
	}
	return out
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

type sample struct {
	Case  string  `json:"case"`
	Mode  string  `json:"mode"`
	Rep   int     `json:"rep"`
	Value float64 `json:"value"`
	// Redirected bytes during an accelerated run: proof the path was taken.
	Redirected uint64 `json:"redirected_bytes,omitempty"`
}

func run(ctx context.Context, o opts) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root (loads BPF programs, makes a cgroup)")
	}
	for _, tool := range []string{"sockperf", "iperf3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: run make deps", tool)
		}
	}
	suffix := randomSuffix()
	b := &bench{o: o, cgroup: filepath.Join(o.cgroup2, "meshturbo-bench-"+suffix)}
	if o.pinCPUs != "" {
		cpus := strings.Split(o.pinCPUs, ",")
		if len(cpus) != 2 {
			return fmt.Errorf("-pin-cpus %q: want CLIENT,SERVER, e.g. 0,1 (or empty: not pinned)", o.pinCPUs)
		}
		b.clientCPU, b.serverCPU = cpus[0], cpus[1]
		if _, err := exec.LookPath("taskset"); err != nil {
			return fmt.Errorf("-pin-cpus needs taskset (util-linux): %w", err)
		}
	}
	if err := os.Mkdir(b.cgroup, 0o755); err != nil {
		return fmt.Errorf("make bench cgroup: %w", err)
	}
	defer func() { err = errors.Join(err, removeCgroup(b.cgroup)) }()
	if b.cgroupFD, err = os.Open(b.cgroup); err != nil {
		return err
	}
	defer b.cgroupFD.Close()
	if b.sockperfPort, err = freePort(); err != nil {
		return err
	}
	if b.iperfPort, err = freePort(); err != nil {
		return err
	}
	goPort, err := freePort()
	if err != nil {
		return err
	}
	victimPort, err := freePort()
	if err != nil {
		return err
	}
	b.goAddr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), goPort).String()
	b.goVictimAddr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), victimPort).String()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	pin := filepath.Join(bpf.DefaultBPFFS, "meshturbo-bench-"+suffix)
	defer func() { err = errors.Join(err, bpf.Uninstall(pin)) }()

	servers := []*exec.Cmd{
		b.command(context.Background(), b.serverCPU, "sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", strconv.Itoa(int(b.sockperfPort))),
		b.command(context.Background(), b.serverCPU, "iperf3", "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(int(b.iperfPort))),
		b.command(context.Background(), b.serverCPU, self, "-go-serve", b.goAddr+","+b.goVictimAddr),
	}
	for _, s := range servers {
		if err := s.Start(); err != nil {
			return fmt.Errorf("start %s: %w", s.Path, err)
		}
		defer func() { _ = s.Process.Kill(); _ = s.Wait() }()
	}
	for _, p := range []uint16{b.sockperfPort, b.iperfPort, goPort, victimPort} {
		if err := waitListening(ctx, p); err != nil {
			return err
		}
	}
	cfg := bpf.Config{CgroupPath: b.cgroup, PinPath: pin, SidecarPorts: []uint16{b.sockperfPort, b.iperfPort, goPort}, SmallMsg: uint32(o.smallMsg)}

	modes := splitList(o.modes)
	for _, m := range modes {
		if !slices.Contains(allModes, m) {
			return fmt.Errorf("unknown mode %q (have %v)", m, allModes)
		}
	}
	if !slices.Contains(modes, "plain") {
		return errors.New("-modes must include plain, the baseline")
	}
	var samples []sample
	for rep := range o.reps {
		order := slices.Clone(modes)
		if rep%2 == 1 {
			slices.Reverse(order)
		}
		for _, r := range o.selected() {
			for _, mode := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if agentOnly[r.name] && noAgent(mode) {
					continue
				}
				var agent *bpf.Agent
				var before bpf.Stats
				if !noAgent(mode) {
					c := cfg
					c.NaiveRedirect = mode == "naive"
					c.KeepDemoted = mode == "keep"
					if agent, err = bpf.New(c); err != nil {
						return err
					}
					before, _ = agent.Stats()
				}
				// Ping-pongs only: the spinners cost bulk runs a fifth of their rate (they
				// share the vCPUs' cores), and a wake-up delay does not matter to them.
				stopAwake := func() {}
				if o.keepAwake && strings.Contains(r.name, "pingpong") {
					if stopAwake, err = keepAwake(); err != nil {
						return err
					}
				}
				vals, err := r.run(ctx, b)
				stopAwake()
				var redirected, demoted, unhooked, backoffs uint64
				if agent != nil {
					after, _ := agent.Stats()
					redirected = after.BytesRedirected - before.BytesRedirected
					demoted = after.SocketsDemoted - before.SocketsDemoted
					unhooked = after.SocketsUnhooked - before.SocketsUnhooked
					backoffs = after.QueueBackoff - before.QueueBackoff
					// Uninstall: the next plain run must see no program at all.
					err = errors.Join(err, agent.Uninstall())
				}
				if err != nil {
					return fmt.Errorf("%s %s: %w", r.name, mode, err)
				}
				for _, m := range r.metrics {
					samples = append(samples, sample{Case: m.name, Mode: mode, Rep: rep, Value: vals[m.name], Redirected: redirected})
					fmt.Fprintf(os.Stderr, "rep %d %-18s %-5s %14.3f %-12s", rep, m.name, mode, vals[m.name], m.unit)
					if agent != nil && m.name == r.metrics[0].name {
						fmt.Fprintf(os.Stderr, " unhooked %d", unhooked)
					}
					if agent != nil {
						fmt.Fprintf(os.Stderr, " redirected %d MiB, sockets moved to TCP %d, queue back-offs %d", redirected>>20, demoted, backoffs)
					}
					fmt.Fprintln(os.Stderr)
				}
			}
		}
	}
	var envoy map[string][]envoyResult
	if o.only == "" || slices.Contains(splitList(o.only), "envoy") {
		if envoy, err = b.runEnvoy(ctx, pin); err != nil {
			return err
		}
		for mode, rs := range envoy {
			for rep, r := range rs {
				samples = append(samples, sample{Case: "envoy_rps", Mode: mode, Rep: rep, Value: r.rps},
					sample{Case: "envoy_p50", Mode: mode, Rep: rep, Value: r.p50us})
			}
		}
	}
	if o.jsonOut != "" {
		j, _ := json.MarshalIndent(samples, "", "  ")
		if err := os.WriteFile(o.jsonOut, j, 0o644); err != nil {
			return err
		}
	}
	report(samples, envoy, o)
	return nil
}

func report(samples []sample, envoy map[string][]envoyResult, o opts) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "case\tunit\tplain\tnaive\tours\tnaive/plain\tours/plain\tcontrol/plain\tsamples plain | naive | ours | control\n")
	ratios, ours := map[string]float64{}, map[string]float64{}
	worst, controlWorst := math.Inf(1), math.Inf(1)
	var agentMetrics []string
	for _, r := range o.selected() {
		for _, m := range r.metrics {
			if agentOnly[r.name] {
				agentMetrics = append(agentMetrics, m.name)
				continue
			}
			vals := byMode(samples, m.name)
			p, n, a, c := median(vals["plain"]), median(vals["naive"]), median(vals["accel"]), median(vals["control"])
			ours[m.name] = a
			if !math.IsNaN(a / p) {
				ratios[m.name] = a / p
				if m.throughput {
					worst = min(worst, a/p)
				}
			}
			if m.throughput && !math.IsNaN(c/p) {
				controlWorst = min(controlWorst, c/p)
			}
			fmt.Fprintf(tw, "%s\t%s\t%.3f\t%.3f\t%.3f\t%.2fx\t%.2fx\t%.2fx\t%s | %s | %s | %s\n", m.name, m.unit, p, n, a, n/p, a/p, c/p,
				fmtList(vals["plain"]), fmtList(vals["naive"]), fmtList(vals["accel"]), fmtList(vals["control"]))
		}
	}
	tw.Flush()
	for _, name := range agentMetrics {
		vals := byMode(samples, name)
		n, a := median(vals["naive"]), median(vals["accel"])
		fmt.Printf("%s (the sk_msg verdict's run time per send, kernel BPF statistics, 2 s of 64 B ping-pong): naive %.0f ns, ours %.0f ns (%.2fx); samples %s | %s\n",
			name, n, a, a/n, fmtList(vals["naive"]), fmtList(vals["accel"]))
	}
	fmt.Printf("(medians of %d interleaved reps of %s, %s for go_stream_64B/1KiB; ours = the agent's default; for latency lower is better;"+
		" control = plain TCP again at the other end of each rep: control/plain is this machine's swing alone, and control_worst_ratio"+
		" its lowest throughput ratio, the one to hold worst_ratio against)\n", o.reps, o.duration, o.smallStreamDuration)
	// Small streams: the lowest of the small-write cases run (sockperf's and the Go
	// harness's). The victim ratio is the accelerated mode's own (victim during the flood ÷
	// before it), not a ratio against plain.
	small := math.NaN()
	for _, name := range []string{"stream_64B", "stream_1KiB", "go_stream_64B", "go_stream_1KiB"} {
		if v, ok := ratios[name]; ok && (math.IsNaN(small) || v < small) {
			small = v
		}
	}
	victim, victimP99 := math.NaN(), math.NaN()
	if v, ok := ours["victim_tput"]; ok {
		victim = v
	}
	if v, ok := ours["victim_p99"]; ok {
		victimP99 = v
	}
	ratio := func(name string) string {
		if v, ok := ratios[name]; ok {
			return fmtRatio(v)
		}
		return "n/a"
	}
	envoyRatio, connect4Ratio := math.NaN(), math.NaN()
	if len(envoy) > 0 {
		fmt.Println()
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "envoy (fortio -c %d → Envoy → fortio server)\treq/s\tp50 usec\treq/s ÷ iptables\tsamples req/s\n", o.envoyConns)
		rps := map[string]float64{}
		for _, mode := range envoyModes {
			var r, l []float64
			for _, x := range envoy[mode] {
				r, l = append(r, x.rps), append(l, x.p50us)
			}
			rps[mode] = median(r)
			fmt.Fprintf(tw, "%s\t%.0f\t%.1f\t%.2fx\t%s\n", mode, median(r), median(l), median(r)/rps["iptables"], fmtList(r))
		}
		tw.Flush()
		fmt.Println("(iptables: Istio's default; +accel: sockmap on the app↔Envoy and Envoy↔server hops. Under iptables NAT the app's" +
			" socket names the server's address, so the app↔Envoy pair can't be matched and only the Envoy↔server hop is redirected;" +
			" connect4 rewrites the app's socket itself, so both hops are.)")
		envoyRatio = rps["connect4+accel"] / rps["iptables"]
		connect4Ratio = rps["connect4"] / rps["iptables"]
		fmt.Printf("envoy_rps_ratio = connect4+accel ÷ iptables (the agent vs Istio's default); connect4_rps_ratio = connect4 ÷ iptables (redirection alone); iptables+accel ÷ iptables = %s\n",
			fmtRatio(rps["iptables+accel"]/rps["iptables"]))
	}
	fmt.Printf("bench-accel: rtt_p50_ratio=%s bulk_ratio=%s small_stream_ratio=%s worst_ratio=%s envoy_rps_ratio=%s connect4_rps_ratio=%s queue_ratio=%s victim_tput_ratio=%s victim_p99_ratio=%s control_worst_ratio=%s\n",
		ratio("go_pingpong_64B_p50"), ratio("bulk_128KiB"), fmtRatio(small), fmtRatio(worst), fmtRatio(envoyRatio), fmtRatio(connect4Ratio),
		ratio("queue_bytes"), fmtRatio(victim), fmtRatio(victimP99), fmtRatio(controlWorst))
}

// byMode collects the samples of one case by mode.
func byMode(samples []sample, name string) map[string][]float64 {
	vals := map[string][]float64{}
	for _, s := range samples {
		if s.Case == name {
			vals[s.Mode] = append(vals[s.Mode], s.Value)
		}
	}
	return vals
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "n/a"
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtList(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = strconv.FormatFloat(x, 'g', 4, 64)
	}
	return strings.Join(parts, " ")
}

// command makes a command that starts inside the bench cgroup, on cpu unless that is empty.
func (b *bench) command(ctx context.Context, cpu, name string, arg ...string) *exec.Cmd {
	if cpu != "" {
		name, arg = "taskset", append([]string{"-c", cpu, name}, arg...)
	}
	cmd := exec.CommandContext(ctx, name, arg...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(b.cgroupFD.Fd())}
	return cmd
}

func (b *bench) output(ctx context.Context, name string, arg ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, max(b.o.duration, b.o.smallStreamDuration)+30*time.Second)
	defer cancel()
	out, err := b.command(ctx, b.clientCPU, name, arg...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", name, strings.Join(arg, " "), err, out)
	}
	return string(out), nil
}

func (b *bench) secs() string { return strconv.Itoa(max(1, int(b.o.duration.Seconds()))) }

var percentileRE = regexp.MustCompile(`percentile\s+([0-9.]+)\s+=\s+([0-9.]+)`)

func (b *bench) sockperfPingPong(ctx context.Context, size int) (map[string]float64, error) {
	out, err := b.output(ctx, "sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", strconv.Itoa(int(b.sockperfPort)),
		"-m", strconv.Itoa(size), "-t", b.secs())
	if err != nil {
		return nil, err
	}
	p := map[string]float64{}
	for _, m := range percentileRE.FindAllStringSubmatch(out, -1) {
		if v, err := strconv.ParseFloat(m[2], 64); err == nil {
			p[m[1]] = v
		}
	}
	if _, ok := p["50.000"]; !ok {
		return nil, fmt.Errorf("sockperf printed no percentiles:\n%s", out)
	}
	return p, nil
}

var msgRateRE = regexp.MustCompile(`Message Rate is ([0-9]+) \[msg/sec\]`)

func (b *bench) sockperfThroughput(ctx context.Context, size int) (float64, error) {
	out, err := b.output(ctx, "sockperf", "throughput", "--tcp", "-i", "127.0.0.1", "-p", strconv.Itoa(int(b.sockperfPort)),
		"-m", strconv.Itoa(size), "-t", b.secs())
	if err != nil {
		return 0, err
	}
	m := msgRateRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("sockperf printed no message rate:\n%s", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

func (b *bench) iperf(ctx context.Context, length string) (float64, error) {
	out, err := b.output(ctx, "iperf3", "-c", "127.0.0.1", "-p", strconv.Itoa(int(b.iperfPort)), "-t", b.secs(), "-l", length, "-J")
	if err != nil {
		return 0, err
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	if res.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", res.Error)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

func freePort() (uint16, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return netip.MustParseAddrPort(l.Addr().String()).Port(), nil
}

func waitListening(ctx context.Context, port uint16) error {
	return waitListeningOn(ctx, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port))
}

func waitListeningOn(ctx context.Context, ap netip.AddrPort) error {
	addr := ap.String()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("nothing listens on %s", addr)
}

func removeCgroup(dir string) error {
	var err error
	for range 100 {
		if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("remove bench cgroup: %w", err)
}

func randomSuffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
