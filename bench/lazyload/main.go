// Command lazyload is `make bench-lazyload`. With the real Consul, istiod and Envoy from
// `make deps`, a synthetic mesh of S services (default 1,000, over 10 ports as real meshes
// share a few) is bridged into Istio, and in one run it measures:
//
//   - a full sidecar (no lazy loading: config for every service) — Envoy's allocated memory
//     (admin /memory), /config_dump bytes (with EDS) and its cluster count;
//   - a scoped sidecar of a lazy-load workload after it called C of the services (default 5),
//     each first call through the fallback — the same three figures, and the time from each
//     first call to the direct path in its own Envoy;
//   - the xDS responses the scoped sidecar receives while U unrelated services change
//     (default 100), counted from its own stats once istiod shows every proxy in sync.
//
// The two sidecars run one after the other (both bind the service ports on 127.0.0.1); a third,
// full, sidecar in REDIRECT mode (which binds no service port) observes that istiod has pushed
// the unrelated changes. It ends with
// `bench-lazyload: memory_ratio=… config_bytes_ratio=… clusters_scoped=… clusters_full=… unrelated_pushes=…`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

type options struct {
	services, ports, calls, unrelated int
	out                               string
}

func main() {
	var o options
	flag.IntVar(&o.services, "services", 1000, "services in the registry")
	flag.IntVar(&o.ports, "ports", 10, "distinct service ports they share")
	flag.IntVar(&o.calls, "calls", 5, "services the client workload calls")
	flag.IntVar(&o.unrelated, "unrelated", 100, "unrelated services changed while counting the client's pushes")
	flag.StringVar(&o.out, "out", "out/bench-lazyload", "directory for logs")
	flag.Parse()
	env, err := testenv.NewEnv(o.out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-lazyload:", err)
		os.Exit(1)
	}
	err = run(env, o)
	env.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-lazyload:", err, "(logs in", env.Dir()+")")
		os.Exit(1)
	}
}

// sidecarFigures is what one Envoy costs.
type sidecarFigures struct {
	allocated, configBytes, clusters int
	// xdsBytes is the config_dump without its bootstrap section: what xDS delivered. The
	// bootstrap (mostly Envoy's list of its own extensions, ~80 KB) is the same in both.
	xdsBytes int
	dump     string
}

func run(env *testenv.Env, o options) error {
	if o.calls+o.unrelated > o.services {
		return fmt.Errorf("-calls + -unrelated (%d) exceed -services (%d)", o.calls+o.unrelated, o.services)
	}
	deps, err := testenv.LoadDeps()
	if err != nil {
		return fmt.Errorf("%w (run 'make deps')", err)
	}
	bin := filepath.Join(env.Dir(), "bin")
	if out, err := exec.Command("go", "build", "-o", bin+"/", "./cmd/meshturbo-xds", "./cmd/meshturbo-upgrade").CombinedOutput(); err != nil {
		return fmt.Errorf("build: %w\n%s", err, out)
	}
	consul, err := testenv.StartConsulIn(env, deps)
	if err != nil {
		return err
	}
	cfg := api.DefaultConfig()
	cfg.Address = consul.HTTPAddr
	cc, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	ports, stop, err := startServers(o.ports)
	if err != nil {
		return err
	}
	defer stop()
	name := func(i int) string { return fmt.Sprintf("svc-%04d", i) }
	port := func(i int) int { return ports[i%len(ports)] }
	for i := range o.services {
		if err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name(i), Name: name(i), Address: "127.0.0.2",
			Port: port(i), Meta: map[string]string{"protocol": "http"}}); err != nil {
			return fmt.Errorf("register %s: %w", name(i), err)
		}
	}
	fmt.Printf("registered %d services on %d ports in Consul\n", o.services, len(ports))

	// Learned edges from an earlier run would make the first calls skip the fallback.
	if err := os.Remove(filepath.Join(env.Dir(), "edges.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	caDir := filepath.Join(env.Dir(), "ca")
	if err := os.MkdirAll(caDir, 0o755); err != nil {
		return err
	}
	ca, err := hotupgrade.NewCA("cluster.local")
	if err != nil {
		return err
	}
	if err := ca.Write(caDir); err != nil {
		return err
	}
	free, err := testenv.FreeLoopbackPorts(5)
	if err != nil {
		return err
	}
	mcp, admin, fbAdmin := testenv.Addr(free[0]), testenv.Addr(free[1]), testenv.Addr(free[2])
	cfgPath := filepath.Join(env.Dir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`listen: %s
admin: {listen: %s}
sources:
- consul: {address: %s}
lazyload:
  caDir: %s
  stateFile: %s
  fallback: {address: 127.0.0.3, httpPort: %d, envoy: %s, admin: %s}
  workloads:
  - {namespace: default, name: client, selector: {app: client}}
`, mcp, admin, consul.HTTPAddr, caDir, filepath.Join(env.Dir(), "edges.json"), free[3], deps.Envoy, fbAdmin)), 0o644); err != nil {
		return err
	}
	if _, err := testenv.StartIn(env, "meshturbo-xds", exec.Command(filepath.Join(bin, "meshturbo-xds"), "-config", cfgPath, "-log-level", "warn"),
		testenv.HTTPProbe("http://"+admin+"/readyz", nil), 60*time.Second); err != nil {
		return err
	}
	istiod, err := testenv.StartIstiodIn(env, deps, mcp)
	if err != nil {
		return err
	}
	startSidecar := func(pod, interception string) (string, *testenv.Process, error) {
		p, err := testenv.FreeLoopbackPorts(2)
		if err != nil {
			return "", nil, err
		}
		envoyAdmin := testenv.Addr(p[0])
		if err := os.MkdirAll(filepath.Join(env.Dir(), pod), 0o755); err != nil {
			return "", nil, err
		}
		proc, err := testenv.StartIn(env, "sidecar-"+pod, exec.Command(filepath.Join(bin, "meshturbo-upgrade"),
			"-envoy", deps.Envoy, "-istiod", istiod.XDSAddr, "-envoy-admin", envoyAdmin, "-admin", testenv.Addr(p[1]),
			"-pod", pod, "-namespace", "default", "-labels", "app="+pod, "-service-account", pod, "-ca-dir", caDir,
			"-interception", interception, "-concurrency", "1", "-work-dir", filepath.Join(env.Dir(), pod)),
			testenv.HTTPProbe("http://"+testenv.Addr(p[1])+"/healthz", nil), 60*time.Second)
		return envoyAdmin, proc, err
	}

	// The full sidecar: a workload lazy loading does not narrow.
	fullAdmin, fullProc, err := startSidecar("full", "none")
	if err != nil {
		return err
	}
	if err := await(60*time.Second, "the full sidecar holds every service", func() error {
		n, err := countClusters(fullAdmin, ".service.consul")
		if err == nil && n < o.services {
			err = fmt.Errorf("%d of %d service clusters", n, o.services)
		}
		return err
	}); err != nil {
		return err
	}
	full, err := figures(fullAdmin)
	if err != nil {
		return err
	}
	if err := fullProc.Stop(); err != nil {
		return err
	}

	// The scoped sidecar: calls o.calls services, each first call through the fallback.
	clientAdmin, _, err := startSidecar("client", "none")
	if err != nil {
		return err
	}
	if err := await(60*time.Second, "the scoped sidecar holds the fallback", func() error {
		n, err := countClusters(clientAdmin, "meshturbo-fallback.meshturbo.internal")
		if err == nil && n == 0 {
			err = errors.New("no fallback cluster yet")
		}
		return err
	}); err != nil {
		return err
	}
	var lags []time.Duration
	for i := range o.calls {
		host := name(i*7) + ".service.consul"
		if err := call(host, port(i*7)); err != nil {
			return fmt.Errorf("first call to %s (through the fallback): %w", host, err)
		}
		start := time.Now()
		if err := await(10*time.Second, "the direct path to "+host, func() error {
			n, err := countClusters(clientAdmin, fmt.Sprintf("outbound|%d||%s", port(i*7), host))
			if err == nil && n == 0 {
				err = errors.New("not yet")
			}
			return err
		}); err != nil {
			return err
		}
		lags = append(lags, time.Since(start))
	}
	if err := awaitInSync(istiod.DebugAddr); err != nil {
		return err
	}
	scoped, err := figures(clientAdmin)
	if err != nil {
		return err
	}

	// Unrelated changes: a second instance for o.unrelated services the client never calls,
	// observed by a full sidecar that binds no service port (REDIRECT mode).
	observerAdmin, _, err := startSidecar("observer", "redirect")
	if err != nil {
		return err
	}
	if err := await(60*time.Second, "the observer holds every service", func() error {
		n, err := countClusters(observerAdmin, ".service.consul")
		if err == nil && n < o.services {
			err = fmt.Errorf("%d of %d", n, o.services)
		}
		return err
	}); err != nil {
		return err
	}
	if err := awaitInSync(istiod.DebugAddr); err != nil {
		return err
	}
	before, err := xdsUpdates(clientAdmin)
	if err != nil {
		return err
	}
	var changed []int
	for i := o.services - o.unrelated; i < o.services; i++ {
		changed = append(changed, i)
		if err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name(i) + "-b", Name: name(i), Address: "127.0.0.4",
			Port: port(i), Meta: map[string]string{"protocol": "http"}}); err != nil {
			return err
		}
	}
	if err := await(60*time.Second, "the observer sees every unrelated change", func() error {
		body, err := adminGet(observerAdmin, "/clusters")
		if err != nil {
			return err
		}
		for _, i := range changed {
			if !strings.Contains(body, fmt.Sprintf("||%s.service.consul::127.0.0.4:", name(i))) {
				return fmt.Errorf("%s not updated yet", name(i))
			}
		}
		return nil
	}); err != nil {
		return err
	}
	if err := awaitInSync(istiod.DebugAddr); err != nil {
		return err
	}
	after, err := xdsUpdates(clientAdmin)
	if err != nil {
		return err
	}
	unrelated := after - before

	for n, f := range map[string]sidecarFigures{"full": full, "scoped": scoped} {
		if err := os.WriteFile(filepath.Join(env.Dir(), n+"-config_dump.json"), []byte(f.dump), 0o644); err != nil {
			return err
		}
	}
	slices.Sort(lags)
	ratio := func(a, b int) string { return strconv.FormatFloat(float64(a)/float64(b), 'f', 3, 64) }
	fmt.Printf("full sidecar:   allocated %.1f MiB, config_dump %d bytes (%d from xDS), %d clusters\n", mib(full.allocated), full.configBytes, full.xdsBytes, full.clusters)
	fmt.Printf("scoped sidecar: allocated %.1f MiB, config_dump %d bytes (%d from xDS), %d clusters (%d services called)\n", mib(scoped.allocated), scoped.configBytes, scoped.xdsBytes, scoped.clusters, o.calls)
	fmt.Printf("first call → direct path in the scoped Envoy: min %s, max %s over %d services\n", lags[0].Round(time.Millisecond), lags[len(lags)-1].Round(time.Millisecond), len(lags))
	fmt.Printf("xDS responses to the scoped sidecar while %d unrelated services changed: %d\n", o.unrelated, unrelated)
	fmt.Printf("bench-lazyload: memory_ratio=%s config_bytes_ratio=%s xds_config_bytes_ratio=%s clusters_scoped=%d clusters_full=%d unrelated_pushes=%d\n",
		ratio(scoped.allocated, full.allocated), ratio(scoped.configBytes, full.configBytes), ratio(scoped.xdsBytes, full.xdsBytes),
		scoped.clusters, full.clusters, unrelated)
	return nil
}

func mib(b int) float64 { return float64(b) / (1 << 20) }

// startServers starts one HTTP server per port on 127.0.0.2, on ports also free on 127.0.0.1
// (the sidecars bind them) and 127.0.0.3 (the fallback).
func startServers(n int) ([]int, func(), error) {
	var ports []int
	var servers []*http.Server
	stop := func() {
		for _, s := range servers {
			s.Close()
		}
	}
	for len(ports) < n {
		lis, err := testenv.ListenSharedPort("127.0.0.2", "127.0.0.1", "127.0.0.3")
		if err != nil {
			stop()
			return nil, nil, err
		}
		p := lis.Addr().(*net.TCPAddr).Port
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello from", r.Host) }),
			ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, srv)
		go func() { _ = srv.Serve(lis) }()
		ports = append(ports, p)
	}
	return ports, stop, nil
}

// call makes one request to host through the sidecar on 127.0.0.1:port.
func call(host string, port int) error {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", port))
		}}}
	resp, err := c.Get(fmt.Sprintf("http://%s:%d/", host, port))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), host) {
		return fmt.Errorf("HTTP %d %q", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return nil
}

func await(within time.Duration, what string, check func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %s: %w", what, within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func adminGet(addr, path string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return testenv.AdminGet(ctx, addr, path)
}

// countClusters counts the clusters in Envoy whose name contains sub.
func countClusters(addr, sub string) (int, error) {
	body, err := adminGet(addr, "/clusters")
	if err != nil {
		return 0, err
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(body, "\n") {
		name, _, ok := strings.Cut(line, "::")
		if ok && strings.Contains(name, sub) {
			seen[name] = true
		}
	}
	return len(seen), nil
}

// figures reads what the Envoy at addr costs: allocated memory, config bytes, clusters.
func figures(addr string) (sidecarFigures, error) {
	var f sidecarFigures
	body, err := adminGet(addr, "/memory")
	if err != nil {
		return f, err
	}
	var mem struct {
		Allocated string `json:"allocated"`
	}
	if err := json.Unmarshal([]byte(body), &mem); err != nil {
		return f, fmt.Errorf("/memory %q: %w", body, err)
	}
	if f.allocated, err = strconv.Atoi(mem.Allocated); err != nil {
		return f, err
	}
	dump, err := adminGet(addr, "/config_dump?include_eds")
	if err != nil {
		return f, err
	}
	f.configBytes = len(dump)
	f.dump = dump
	var cd struct {
		Configs []json.RawMessage `json:"configs"`
	}
	if err := json.Unmarshal([]byte(dump), &cd); err != nil {
		return f, fmt.Errorf("/config_dump: %w", err)
	}
	for _, c := range cd.Configs {
		if !strings.Contains(string(c[:min(len(c), 200)]), "BootstrapConfigDump") {
			f.xdsBytes += len(c)
		}
	}
	stats, err := adminGet(addr, "/stats?filter=^cluster_manager%5C.active_clusters$")
	if err != nil {
		return f, err
	}
	_, v, _ := strings.Cut(strings.TrimSpace(stats), ": ")
	if f.clusters, err = strconv.Atoi(v); err != nil {
		return f, fmt.Errorf("cluster_manager.active_clusters %q: %w", stats, err)
	}
	return f, nil
}

// xdsUpdates sums every xDS response the Envoy counted (CDS, LDS, RDS, EDS, SDS).
func xdsUpdates(addr string) (int, error) {
	body, err := adminGet(addr, "/stats?filter=update_attempt$")
	if err != nil {
		return 0, err
	}
	total := 0
	for _, line := range strings.Split(body, "\n") {
		if _, v, ok := strings.Cut(line, ": "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return 0, fmt.Errorf("stat line %q: %w", line, err)
			}
			total += n
		}
	}
	return total, nil
}

// awaitInSync waits until istiod has every proxy's last push acknowledged.
func awaitInSync(debugAddr string) error {
	return await(30*time.Second, "istiod shows every proxy in sync", func() error {
		body, err := adminGet(debugAddr, "/debug/syncz")
		if err != nil {
			return err
		}
		var st []map[string]any
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			return fmt.Errorf("/debug/syncz: %w", err)
		}
		for _, p := range st {
			for _, t := range []string{"cluster", "listener", "route", "endpoint"} {
				if p[t+"_sent"] != p[t+"_acked"] {
					return fmt.Errorf("%v: %s sent %v, acked %v", p["proxy"], t, p[t+"_sent"], p[t+"_acked"])
				}
			}
		}
		return nil
	})
}
