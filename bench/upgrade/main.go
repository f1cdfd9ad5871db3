// Command upgrade (make bench-upgrade) measures hot upgrades of a real Envoy under real load:
// fortio sends a constant rate of requests (HTTP/1.1 with keep-alive, HTTP/1.1 without,
// HTTP/2, gRPC unary) through an Envoy run by hotupgrade.Manager to a fortio server, first
// for a baseline period without upgrades, then while the Manager runs N consecutive
// upgrades. It prints failed requests and p50/p99/max latency of both runs per scenario, then
// the same across Envoy versions (the old release and the current one, alternating), and ends
// with one line:
//
//	bench-upgrade: upgrades=<n> failed=<n> p99_delta_ms=<n> skew_upgrades=<n> skew_failed=<n>
//
// The scenario upgrades use Envoy's hot restart. The skew upgrades use the reuseport hand-off
// that version skew needs (-skew-handoff; the two installed releases share a hot-restart
// version, so "auto" would hot-restart between them): each new Envoy runs on its own next to
// the old one, on the same ports with SO_REUSEPORT. Each part says which hand-off it used,
// as the upgrade results report it.
//
// The components come from `make deps` (internal/testenv). It exits 1 if a request failed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

type args struct {
	upgrades, skewUpgrades int
	qps, conns             int
	baseline               time.Duration
	scenarios              string
	dir                    string
	skewHandoff            string
}

func main() {
	var a args
	flag.IntVar(&a.upgrades, "upgrades", 100, "consecutive upgrades per scenario")
	flag.IntVar(&a.skewUpgrades, "skew-upgrades", 100, "consecutive upgrades alternating Envoy versions (all scenarios at once)")
	flag.IntVar(&a.qps, "qps", 1000, "requests per second per scenario")
	flag.IntVar(&a.conns, "c", 8, "fortio connections per scenario")
	flag.DurationVar(&a.baseline, "baseline", time.Minute, "baseline run without upgrades, per scenario")
	flag.StringVar(&a.scenarios, "scenarios", "http1-keepalive,http1-close,http2,grpc", "scenarios to run")
	flag.StringVar(&a.dir, "dir", "", "directory for logs and results (default: a temp dir, kept)")
	flag.StringVar(&a.skewHandoff, "skew-handoff", hotupgrade.HandoffReusePort, "hand-off of the skew upgrades: reuseport (as across hot-restart versions), auto or hotrestart")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	failed, err := run(ctx, a)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-upgrade:", err)
		os.Exit(2)
	}
	if failed {
		os.Exit(1)
	}
}

// stats are one fortio run's numbers.
type stats struct {
	total, failed int64
	p50, p99, max float64 // milliseconds
}

func (s stats) String() string {
	return fmt.Sprintf("requests=%-7d failed=%-4d p50=%6.2fms p99=%6.2fms max=%7.2fms", s.total, s.failed, s.p50, s.p99, s.max)
}

type bench struct {
	a              args
	deps           testenv.Deps
	dir            string
	log            *slog.Logger
	httpURL, gAddr string // Envoy's listeners
	m              *hotupgrade.Manager
	admin, backend string
	grpcBackend    string
	listenHTTP     string
	tag            int
	handoffs       map[string]int // upgrades per hand-off used, for the part running now
}

func run(ctx context.Context, a args) (bool, error) {
	deps, err := testenv.LoadDeps()
	if err != nil {
		return false, fmt.Errorf("%w (run 'make deps')", err)
	}
	if a.dir == "" {
		if a.dir, err = os.MkdirTemp("", "bench-upgrade-"); err != nil {
			return false, err
		}
	}
	env, err := testenv.NewEnv(a.dir)
	if err != nil {
		return false, err
	}
	defer env.Close()
	envoyLog, err := os.Create(filepath.Join(a.dir, "envoy.log"))
	if err != nil {
		return false, err
	}
	defer envoyLog.Close()
	b := &bench{a: a, deps: deps, dir: a.dir, log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	ports, err := freePorts(5)
	if err != nil {
		return false, err
	}
	b.backend, b.grpcBackend = testenv.Addr(ports[0]), testenv.Addr(ports[1])
	b.admin, b.listenHTTP, b.gAddr = testenv.Addr(ports[2]), testenv.Addr(ports[3]), testenv.Addr(ports[4])
	b.httpURL = "http://" + b.listenHTTP + "/echo"
	server := exec.Command(deps.Fortio, "server", "-http-port", b.backend, "-grpc-port", b.grpcBackend,
		"-redirect-port", "disabled", "-tcp-port", "disabled", "-udp-port", "disabled")
	if _, err := testenv.StartIn(env, "fortio-server", server, testenv.DialProbe(b.backend), 30*time.Second); err != nil {
		return false, err
	}
	b.m, err = hotupgrade.New(ctx, hotupgrade.Config{
		Envoy: deps.Envoy, Bootstrap: b.bootstrap(), AdminAddr: b.admin,
		ExtraArgs: []string{"--concurrency", "2", "--log-level", "warn"},
		Output:    envoyLog, Logger: b.log, DrainTimeout: 30 * time.Second,
	})
	if err != nil {
		return false, err
	}
	defer b.m.Close()
	fmt.Printf("bench-upgrade: Envoy %s (old %s), fortio %d qps x %d connections per scenario, logs in %s\n",
		deps.EnvoyVersion, deps.EnvoyOldVersion, a.qps, a.conns, a.dir)

	var upgrades int
	var failed int64
	p99Delta := math.Inf(-1)
	scenarios := strings.Split(a.scenarios, ",")
	for _, sc := range scenarios {
		base, err := b.fortio(ctx, sc, "baseline", func() error { return sleep(ctx, a.baseline) })
		if err != nil {
			return false, err
		}
		n := 0
		b.handoffs = map[string]int{}
		up, err := b.fortio(ctx, sc, "upgrades", func() error {
			for ; n < a.upgrades; n++ {
				if err := b.upgrade(ctx, "", hotupgrade.HandoffHotRestart); err != nil {
					return err
				}
			}
			return nil
		})
		upgrades += n
		if err != nil {
			return false, err
		}
		failed += base.failed + up.failed
		p99Delta = math.Max(p99Delta, up.p99-base.p99)
		fmt.Printf("%-16s baseline %s\n%-16s %3d upgr. %s handoff=%s\n", sc, base, sc, n, up, handoffsUsed(b.handoffs))
	}

	// Version skew: all scenarios at once, alternating the old and the current Envoy.
	var skewFailed int64
	skew := 0
	var wg sync.WaitGroup
	results := make([]stats, len(scenarios))
	errs := make([]error, len(scenarios))
	started := make(chan struct{})
	done := make(chan struct{})
	for i, sc := range scenarios {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = b.fortio(ctx, sc, "skew", func() error { <-done; return nil })
		}()
	}
	go func() { time.Sleep(time.Second); close(started) }()
	<-started
	var skewErr error
	b.handoffs = map[string]int{}
	for ; skew < a.skewUpgrades; skew++ {
		bin := deps.EnvoyOld
		if skew%2 == 1 {
			bin = deps.Envoy
		}
		if skewErr = b.upgrade(ctx, bin, a.skewHandoff); skewErr != nil {
			break
		}
	}
	close(done)
	wg.Wait()
	if err := errors.Join(append(errs, skewErr)...); err != nil {
		return false, err
	}
	for i, sc := range scenarios {
		skewFailed += results[i].failed
		fmt.Printf("%-16s %3d skew   %s handoff=%s\n", sc, skew, results[i], handoffsUsed(b.handoffs))
	}
	st := b.m.Status()
	fmt.Printf("final: epoch %d, Envoy %s, %d upgrades, %d rollbacks, %d rejected\n", st.Epoch, st.Version, st.Upgrades, st.Rollbacks, st.Rejected)
	fmt.Printf("bench-upgrade: upgrades=%d failed=%d p99_delta_ms=%d skew_upgrades=%d skew_failed=%d\n",
		upgrades, failed, int(math.Round(p99Delta)), skew, skewFailed)
	return failed+skewFailed > 0, nil
}

// upgrade runs one upgrade to a new bootstrap (and binary, if set) with the given hand-off.
func (b *bench) upgrade(ctx context.Context, binary, handoff string) error {
	b.tag++
	res, err := b.m.Upgrade(ctx, hotupgrade.UpgradeRequest{Binary: binary, Bootstrap: b.bootstrapTagged(b.tag), Handoff: handoff})
	if err != nil {
		return fmt.Errorf("upgrade %d: %w", b.tag, err)
	}
	b.handoffs[res.Handoff]++
	if strings.HasPrefix(res.OldStopped, "drain timeout") || strings.HasPrefix(res.OldStopped, "exited") {
		b.log.Warn("old epoch not drained", "epoch", res.FromEpoch, "why", res.OldStopped)
	}
	return nil
}

// fortio runs one fortio load of a scenario for as long as during runs.
func (b *bench) fortio(ctx context.Context, scenario, phase string, during func() error) (stats, error) {
	out := filepath.Join(b.dir, scenario+"-"+phase+".json")
	args := []string{"load", "-qps", strconv.Itoa(b.a.qps), "-c", strconv.Itoa(b.a.conns), "-t", "0", "-json", out, "-a=false"}
	target := b.httpURL
	switch scenario {
	case "http1-keepalive":
		// fortio's own HTTP/1.1 client reuses a connection after a response that said
		// Connection: close (how a draining Envoy asks clients to reconnect) and waits on it
		// until its timeout; Go's client, like browsers and most libraries, reconnects.
		args = append(args, "-stdclient")
	case "http1-close":
		args = append(args, "-keepalive=false")
	case "http2":
		args = append(args, "-h2")
	case "grpc":
		args = append(args, "-grpc", "-ping")
		target = b.gAddr
	default:
		return stats{}, fmt.Errorf("unknown scenario %q", scenario)
	}
	logf, err := os.Create(filepath.Join(b.dir, scenario+"-"+phase+".log"))
	if err != nil {
		return stats{}, err
	}
	defer logf.Close()
	cmd := exec.Command(b.deps.Fortio, append(args, target)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return stats{}, fmt.Errorf("fortio: %w", err)
	}
	derr := during()
	_ = cmd.Process.Signal(os.Interrupt) // fortio -t 0 runs until interrupted, then reports
	werr := cmd.Wait()
	if derr != nil {
		return stats{}, derr
	}
	s, err := readFortio(out)
	if err != nil {
		return stats{}, fmt.Errorf("fortio %s %s: %w (%v; log %s)", scenario, phase, err, werr, logf.Name())
	}
	return s, ctx.Err()
}

func readFortio(path string) (stats, error) {
	f, err := os.Open(path)
	if err != nil {
		return stats{}, err
	}
	defer f.Close()
	var r struct {
		RetCodes          map[string]int64
		DurationHistogram struct {
			Count       int64
			Max         float64
			Percentiles []struct{ Percentile, Value float64 }
		}
	}
	if err := json.NewDecoder(io.LimitReader(f, 64<<20)).Decode(&r); err != nil {
		return stats{}, err
	}
	s := stats{total: r.DurationHistogram.Count, max: r.DurationHistogram.Max * 1000}
	for code, n := range r.RetCodes {
		if code != "200" && code != "SERVING" {
			s.failed += n
		}
	}
	if ok := r.RetCodes["200"] + r.RetCodes["SERVING"]; ok+s.failed < s.total {
		s.failed = s.total - ok // requests that ended without a code
	}
	for _, p := range r.DurationHistogram.Percentiles {
		switch p.Percentile {
		case 50:
			s.p50 = p.Value * 1000
		case 99:
			s.p99 = p.Value * 1000
		}
	}
	return s, nil
}

func (b *bench) bootstrap() []byte { return b.bootstrapTagged(0) }

// bootstrapTagged is the static Envoy config: HTTP on one listener, gRPC on another, each to
// the fortio server; tag changes a response header so each upgrade runs a new config.
func (b *bench) bootstrapTagged(tag int) []byte {
	hp := func(a string) (string, string) { h, p, _ := net.SplitHostPort(a); return h, p }
	ah, ap := hp(b.admin)
	lh, lp := hp(b.listenHTTP)
	gh, gp := hp(b.gAddr)
	bh, bp := hp(b.backend)
	gbh, gbp := hp(b.grpcBackend)
	listener := func(name, host, port, cluster string) string {
		return fmt.Sprintf(`  - name: %s
    address: {socket_address: {address: %s, port_value: %s}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: %s
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add: [{header: {key: x-config, value: "%d"}}]
              routes: [{match: {prefix: "/"}, route: {cluster: %s, timeout: 0s}}]
          http_filters:
          - {name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
`, name, host, port, name, tag, cluster)
	}
	cluster := func(name, host, port string, h2 bool) string {
		opts := ""
		if h2 {
			opts = `    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
`
		}
		return fmt.Sprintf(`  - name: %s
    type: STATIC
    connect_timeout: 1s
%s    load_assignment:
      cluster_name: %s
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}]}]
`, name, opts, name, host, port)
	}
	return []byte(fmt.Sprintf("admin: {address: {socket_address: {address: %s, port_value: %s}}}\nstatic_resources:\n  listeners:\n%s%s  clusters:\n%s%s",
		ah, ap, listener("http", lh, lp, "fortio_http"), listener("grpc", gh, gp, "fortio_grpc"),
		cluster("fortio_http", bh, bp, false), cluster("fortio_grpc", gbh, gbp, true)))
}

// handoffsUsed says which hand-offs a part's upgrades used, e.g. "reuseport" or
// "hotrestart:3,reuseport:97".
func handoffsUsed(used map[string]int) string {
	var names []string
	for h := range used {
		names = append(names, h)
	}
	sort.Strings(names)
	if len(names) == 1 {
		return names[0]
	}
	var parts []string
	for _, h := range names {
		parts = append(parts, fmt.Sprintf("%s:%d", h, used[h]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ",")
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
