package main

// The same comparison through a real Envoy sidecar: fortio (the app) → Envoy → fortio server,
// all on this node, requests/s and p50 latency. The app connects to the server's own address;
// redirection brings the connection to Envoy's outbound listener, whose original_dst listener
// filter reads SO_ORIGINAL_DST and whose ORIGINAL_DST cluster connects there. Four setups:
//
//	iptables        nat OUTPUT REDIRECT (as Istio's init container does), no sockmap: Istio's default
//	iptables+accel  the same with sockmap acceleration
//	connect4        our cgroup/connect4 + getsockopt redirection, no sockmap acceleration
//	connect4+accel  both: the full agent
//
// Acceleration covers the app↔Envoy hop and the Envoy↔server hop (the server's port counts as a
// sidecar port: it models the inbound sidecar→app hop of the server's pod). Envoy is started
// afresh for every run, so no pooled upstream connection carries one run's setup into the
// next.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshturbo/meshturbo/bpf"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

var envoyModes = []string{"iptables", "iptables+accel", "connect4", "connect4+accel"}

// The server's address (the app's destination) and the address Envoy binds its upstream
// connections to, so that the iptables rule can leave them alone (as Istio does by uid).
var (
	envoyServerIP   = netip.MustParseAddr("127.0.0.10")
	envoyUpstreamIP = netip.MustParseAddr("127.0.0.2")
)

type envoyBench struct {
	b         *bench
	deps      testenv.Deps
	dir       string
	appCg     *os.File
	sidecarCg string
	sidecarFD *os.File
	server    netip.AddrPort
	// Envoy's outbound port under iptables and under connect4: two ports, so that a
	// connect4 connection can never share its reply tuple with a NATed connection of an
	// earlier iptables run that conntrack still remembers (the kernel would take its
	// SYN-ACK for that connection's reply and un-NAT it).
	outboundNAT, outboundBPF uint16
	chain                    string
}

type envoyResult struct {
	rps, p50us float64
}

func (b *bench) runEnvoy(ctx context.Context, pin string) (_ map[string][]envoyResult, err error) {
	deps, err := testenv.LoadDeps()
	if err != nil {
		return nil, fmt.Errorf("envoy bench: %w (run make deps)", err)
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return nil, errors.New("envoy bench: iptables not found: apt-get install iptables")
	}
	e := &envoyBench{b: b, deps: deps, chain: "MT_BENCH_" + strings.ToUpper(filepath.Base(b.cgroup)[len("meshturbo-bench-"):])}
	if e.dir, err = os.MkdirTemp("", "meshturbo-bench-envoy-"); err != nil {
		return nil, err
	}
	defer func() {
		if err == nil {
			os.RemoveAll(e.dir)
		}
	}()
	for _, name := range []string{"app", "sidecar"} {
		dir := filepath.Join(b.cgroup, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, fmt.Errorf("envoy bench: make cgroup: %w", err)
		}
		defer func() { err = errors.Join(err, removeCgroup(dir)) }()
		f, err := os.Open(dir)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if name == "app" {
			e.appCg = f
		} else {
			e.sidecarCg, e.sidecarFD = dir, f
		}
	}
	sp, err := freePort()
	if err != nil {
		return nil, err
	}
	if e.outboundNAT, err = freePort(); err != nil {
		return nil, err
	}
	if e.outboundBPF, err = freePort(); err != nil {
		return nil, err
	}
	e.server = netip.AddrPortFrom(envoyServerIP, sp)
	server := exec.Command(deps.Fortio, "server", "-http-port", e.server.String(), "-grpc-port", "disabled",
		"-redirect-port", "disabled", "-tcp-port", "disabled", "-udp-port", "disabled", "-logger-json=false", "-loglevel", "warning")
	server.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(e.appCg.Fd())}
	slog := logFile(e.dir, "fortio-server.log")
	server.Stdout, server.Stderr = slog, slog
	err = server.Start()
	slog.Close() // the child has its own
	if err != nil {
		return nil, fmt.Errorf("start fortio server: %w", err)
	}
	defer func() { _ = server.Process.Kill(); _ = server.Wait() }()
	if err := waitListeningOn(ctx, e.server); err != nil {
		return nil, err
	}
	if err := e.iptables("-t", "nat", "-N", e.chain); err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, e.iptables("-t", "nat", "-X", e.chain)) }()
	if err := e.iptables("-t", "nat", "-A", e.chain, "-p", "tcp", "-d", envoyServerIP.String(), "--dport", strconv.Itoa(int(sp)),
		"!", "-s", envoyUpstreamIP.String(), "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(e.outboundNAT))); err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, e.iptables("-t", "nat", "-F", e.chain)) }()

	out := map[string][]envoyResult{}
	for rep := range b.o.reps {
		order := append([]string(nil), envoyModes...)
		if rep%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, mode := range order {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r, err := e.runMode(ctx, mode, pin)
			if err != nil {
				return nil, fmt.Errorf("envoy %s: %w (logs kept in %s)", mode, err, e.dir)
			}
			out[mode] = append(out[mode], r)
			fmt.Fprintf(os.Stderr, "rep %d envoy %-15s %10.0f req/s  p50 %7.1f usec\n", rep, mode, r.rps, r.p50us)
		}
	}
	return out, nil
}

func (e *envoyBench) runMode(ctx context.Context, mode, pin string) (res envoyResult, err error) {
	iptablesMode := strings.HasPrefix(mode, "iptables")
	outbound := e.outboundBPF
	if iptablesMode {
		outbound = e.outboundNAT
	}
	if iptablesMode {
		if err := e.iptables("-t", "nat", "-I", "OUTPUT", "-j", e.chain); err != nil {
			return res, err
		}
		defer func() { err = errors.Join(err, e.iptables("-t", "nat", "-D", "OUTPUT", "-j", e.chain)) }()
	}
	var agent *bpf.Agent
	if mode != "iptables" {
		cfg := bpf.Config{CgroupPath: e.b.cgroup, PinPath: pin, SmallMsg: uint32(e.b.o.smallMsg)}
		if strings.HasSuffix(mode, "+accel") {
			cfg.SidecarPorts = []uint16{outbound, e.server.Port()}
		}
		if !iptablesMode {
			cfg.Redirect = bpf.RedirectConfig{Enabled: true, SidecarIP: netip.MustParseAddr("127.0.0.1"),
				OutboundPort: outbound, SidecarCgroups: []string{e.sidecarCg}}
		}
		if agent, err = bpf.New(cfg); err != nil {
			return res, err
		}
		if !iptablesMode && !agent.State().Redirect.On {
			_ = agent.Uninstall()
			return res, fmt.Errorf("redirect mode off: %s", agent.State().Redirect.Off)
		}
		defer func() { err = errors.Join(err, agent.Uninstall()) }()
	}
	envoy, err := e.startEnvoy(ctx, outbound)
	if err != nil {
		return res, err
	}
	defer func() { _ = envoy.Process.Signal(syscall.SIGTERM); _ = envoy.Wait() }()
	// One warm-up request through the whole path, then the measured run.
	if _, err := e.fortio(ctx, "-n", "20", "-c", "1"); err != nil {
		b, _ := os.ReadFile(filepath.Join(e.dir, "envoy.log"))
		var st bpf.Stats
		if agent != nil {
			st, _ = agent.Stats()
		}
		return res, fmt.Errorf("warm-up: %w\nenvoy log:\n%s\ncounters: %+v", err, tail(string(b), 20), st)
	}
	var before bpf.Stats
	if agent != nil {
		before, _ = agent.Stats()
	}
	res, err = e.fortio(ctx, "-t", e.b.o.duration.String(), "-c", strconv.Itoa(e.b.o.envoyConns))
	if err != nil {
		return res, err
	}
	if agent != nil {
		after, _ := agent.Stats()
		if strings.HasSuffix(mode, "+accel") && after.BytesRedirected == before.BytesRedirected {
			return res, errors.New("nothing was redirected: acceleration did not engage")
		}
		if !iptablesMode && after.ConnectRedirected == before.ConnectRedirected {
			return res, errors.New("no connect was redirected by connect4")
		}
		fmt.Fprintf(os.Stderr, "    %s: redirected %d MiB in %d sends; connects redirected %d, SO_ORIGINAL_DST answered %d\n", mode,
			(after.BytesRedirected-before.BytesRedirected)>>20, after.MsgRedirected-before.MsgRedirected,
			after.ConnectRedirected-before.ConnectRedirected, after.OrigDstAnswered-before.OrigDstAnswered)
	}
	return res, nil
}

func (e *envoyBench) writeBootstrap(outbound uint16) (string, error) {
	path := filepath.Join(e.dir, "envoy.yaml")
	y := fmt.Sprintf(`static_resources:
  listeners:
  - name: outbound
    address: {socket_address: {address: 127.0.0.1, port_value: %d}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: original_dst}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: original_dst
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    upstream_bind_config: {source_address: {address: %s, port_value: 0}}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
`, outbound, envoyUpstreamIP)
	return path, os.WriteFile(path, []byte(y), 0o644)
}

func (e *envoyBench) startEnvoy(ctx context.Context, outbound uint16) (*exec.Cmd, error) {
	bootstrap, err := e.writeBootstrap(outbound)
	if err != nil {
		return nil, err
	}
	adminPath := filepath.Join(e.dir, "envoy-admin-address")
	_ = os.Remove(adminPath)
	cmd := exec.Command(e.deps.Envoy, "-c", bootstrap, "--concurrency", "1", "--disable-hot-restart",
		"--admin-address-path", adminPath, "-l", "warning")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(e.sidecarFD.Fd())}
	log := logFile(e.dir, "envoy.log")
	cmd.Stdout, cmd.Stderr = log, log
	err = cmd.Start()
	log.Close() // the child has its own
	if err != nil {
		return nil, fmt.Errorf("start envoy %s: %w", e.deps.Envoy, err)
	}
	if err := waitListeningOn(ctx, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), outbound)); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		b, _ := os.ReadFile(filepath.Join(e.dir, "envoy.log"))
		return nil, fmt.Errorf("envoy: %w\n%s", err, tail(string(b), 20))
	}
	return cmd, nil
}

// fortio runs a fortio load from the app cgroup to the server's address.
func (e *envoyBench) fortio(ctx context.Context, args ...string) (envoyResult, error) {
	jsonPath := filepath.Join(e.dir, "fortio.json")
	argv := append([]string{"load", "-qps", "0", "-json", jsonPath, "-r", "0.00001", "-logger-json=false", "-loglevel", "error"}, args...)
	argv = append(argv, "http://"+e.server.String()+"/echo")
	ctx, cancel := context.WithTimeout(ctx, e.b.o.duration+60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.deps.Fortio, argv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(e.appCg.Fd())}
	if out, err := cmd.CombinedOutput(); err != nil {
		return envoyResult{}, fmt.Errorf("fortio load: %w\n%s", err, tail(string(out), 20))
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return envoyResult{}, err
	}
	var r struct {
		ActualQPS         float64
		RetCodes          map[string]int64
		DurationHistogram struct {
			Count       int64
			Percentiles []struct {
				Percentile float64
				Value      float64
			}
		}
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return envoyResult{}, fmt.Errorf("fortio json: %w", err)
	}
	if ok := r.RetCodes["200"]; ok != r.DurationHistogram.Count || ok == 0 {
		return envoyResult{}, fmt.Errorf("fortio: %d of %d requests answered 200 (codes %v)", ok, r.DurationHistogram.Count, r.RetCodes)
	}
	res := envoyResult{rps: r.ActualQPS}
	for _, p := range r.DurationHistogram.Percentiles {
		if p.Percentile == 50 {
			res.p50us = p.Value * 1e6
		}
	}
	return res, nil
}

func (e *envoyBench) iptables(args ...string) error {
	out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func logFile(dir, name string) *os.File {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		f, _ = os.Open(os.DevNull)
	}
	return f
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
