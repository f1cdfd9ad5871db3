// Command meshturbo-demo is `make demo`: on one machine, with no Kubernetes, it starts Consul,
// ZooKeeper, Eureka, meshturbo-xds (with the lazy-load fallback Envoy), istiod and one Envoy
// sidecar (run by meshturbo-upgrade) narrowed by lazy loading. It registers sample services in
// the three registries, calls them through the sidecar — each first call through the fallback,
// later ones direct — shows the sidecar's config before and after, lets non-mesh clients find a
// mesh service in Consul and Eureka, and hot-upgrades the sidecar under load. It stops
// everything it started when done or on Ctrl-C.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/hotupgrade"
	"github.com/meshturbo/meshturbo/internal/testenv"
)

func main() {
	outDir := flag.String("out", "out/demo", "directory for the logs of every process")
	calls := flag.Int("calls", 5, "calls per service")
	child := flag.String("accel-child", "", "internal: run the acceleration workload on this address")
	childRun := flag.Duration("accel-run", accelRun, "internal: how long each acceleration workload runs")
	flag.Parse()
	if *child != "" {
		if err := accelChild(*child, *childRun); err != nil {
			fmt.Fprintln(os.Stderr, "accel workload:", err)
			os.Exit(1)
		}
		return
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env, err := testenv.NewEnv(*outDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshturbo-demo:", err)
		os.Exit(1)
	}
	err = run(ctx, env, *calls)
	env.Close() // stops every process, in reverse order of start
	if err != nil {
		fmt.Fprintln(os.Stderr, "meshturbo-demo:", err)
		fmt.Fprintln(os.Stderr, "logs:", env.Dir())
		os.Exit(1)
	}
	fmt.Println("logs:", env.Dir())
}

// step prints what is being done; the returned func prints how long it took and reports
// whether the demo was interrupted meanwhile (Ctrl-C), so the caller stops there.
func step(ctx context.Context, format string, args ...any) func() error {
	start := time.Now()
	fmt.Printf("• "+format+" ... ", args...)
	return func() error {
		fmt.Printf("ok (%s)\n", time.Since(start).Round(time.Millisecond))
		return ctx.Err()
	}
}

// sample is a demo service: a tiny HTTP server on its own loopback address, known only to Consul.
type sample struct {
	name, registry, ip, greeting string
	port                         int
	srv                          *http.Server
}

func (s *sample) start() error {
	lis, err := testenv.ListenSharedPort(s.ip, "127.0.0.1") // the sidecar binds the same port on 127.0.0.1
	if err != nil {
		return fmt.Errorf("sample %s: %w", s.name, err)
	}
	s.port = lis.Addr().(*net.TCPAddr).Port
	s.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "%s (served by %s)\n", s.greeting, lis.Addr())
	})}
	go func() { _ = s.srv.Serve(lis) }()
	return nil
}

func run(ctx context.Context, env *testenv.Env, callsPerService int) error {
	deps, err := testenv.LoadDeps()
	if err != nil {
		return fmt.Errorf("%w (run 'make deps')", err)
	}

	done := step(ctx, "building meshturbo daemons")
	binDir := filepath.Join(env.Dir(), "bin")
	build := exec.CommandContext(ctx, "go", "build", "-o", binDir+"/", "./cmd/meshturbo-xds", "./cmd/meshturbo-upgrade")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build: %w\n%s", err, out)
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting Consul, ZooKeeper and Eureka")
	consul, err := testenv.StartConsulIn(env, deps)
	if err != nil {
		return err
	}
	zkSrv, err := testenv.StartZooKeeperIn(env, deps)
	if err != nil {
		return err
	}
	eureka, err := testenv.StartEurekaIn(env, deps)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	// Services outside the mesh, each known to one registry only, and one mesh service
	// (greeter) that non-mesh callers find through reverse registration.
	samples := []*sample{
		{name: "catalog", registry: "consul", ip: "127.0.0.2", greeting: "catalog: 3 books in stock"},
		{name: "reviews", registry: "consul", ip: "127.0.0.3", greeting: "reviews: 5 stars"},
		{name: "org.demo.PriceService", registry: "zookeeper", ip: "127.0.0.4", greeting: "prices (Dubbo REST provider): 12.50 EUR"},
		{name: "orders", registry: "eureka", ip: "127.0.0.5", greeting: "orders (Spring Cloud app): 2 open"},
	}
	greeter := &sample{name: "greeter", registry: "mesh", ip: "127.0.0.6", greeting: "greeter (mesh service): hello, non-mesh caller"}
	cfg := api.DefaultConfig()
	cfg.Address = consul.HTTPAddr
	cc, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	done = step(ctx, "registering sample services: 2 in Consul, 1 Dubbo provider in ZooKeeper, 1 app in Eureka")
	for _, s := range append(samples, greeter) {
		if err := s.start(); err != nil {
			return err
		}
		defer s.srv.Close()
		switch s.registry {
		case "consul":
			err = cc.Agent().ServiceRegister(&api.AgentServiceRegistration{
				ID: s.name + "-1", Name: s.name, Address: s.ip, Port: s.port, Meta: map[string]string{"protocol": "http"}})
		case "zookeeper":
			err = testenv.DubboProvider(zkSrv.Addr, s.name, "rest", s.ip, s.port, false)
		case "eureka":
			err = testenv.EurekaInstance(eureka.URL, s.name, s.name+"-1", s.ip, s.port, false)
		}
		if err != nil {
			return fmt.Errorf("register %s in %s: %w", s.name, s.registry, err)
		}
	}
	if err := done(); err != nil {
		return err
	}
	// The rest of the mesh: services this client never calls, which lazy loading keeps out of
	// its sidecar.
	const others = 200
	done = step(ctx, "registering %d more services in Consul that the demo client never calls", others)
	for i := range others {
		name := fmt.Sprintf("inventory-%03d", i)
		if err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name, Name: name, Address: samples[0].ip,
			Port: samples[i%2].port, Meta: map[string]string{"protocol": "http"}}); err != nil {
			return fmt.Errorf("register %s in consul: %w", name, err)
		}
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting meshturbo-xds (registries → ServiceEntry over MCP; greeter → Consul and Eureka; lazy loading)")
	ports, err := testenv.FreeLoopbackPorts(6)
	if err != nil {
		return err
	}
	mcp, admin, envoyAdmin, upAdmin := testenv.Addr(ports[0]), testenv.Addr(ports[1]), testenv.Addr(ports[2]), testenv.Addr(ports[3])
	fbAdmin, fbPort := testenv.Addr(ports[4]), ports[5]
	edges := filepath.Join(env.Dir(), "lazyload-edges.json")
	if err := os.Remove(edges); err != nil && !os.IsNotExist(err) { // the demo starts with nothing learned
		return err
	}
	caDir := filepath.Join(env.Dir(), "mesh-ca")
	if err := writeMeshCA(caDir); err != nil {
		return err
	}
	cfgPath := filepath.Join(env.Dir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`listen: %s
admin: {listen: %s}
sources:
- consul: {address: %s}
  registerMeshServices: true
- zookeeper: {servers: [%s]}
- eureka: {urls: [%s], pollInterval: 250ms}
  registerMeshServices: true
meshServices:
- {name: greeter, address: %s, port: %d, protocol: http}
lazyload:
  caDir: %s
  stateFile: %s
  fallback: {address: 127.0.0.7, httpPort: %d, envoy: %s, admin: %s}
  workloads:
  - {namespace: default, name: demo-client, selector: {app: demo-client}}
`, mcp, admin, consul.HTTPAddr, zkSrv.Addr, eureka.URL, greeter.ip, greeter.port,
		caDir, edges, fbPort, deps.Envoy, fbAdmin)), 0o644); err != nil {
		return err
	}
	if _, err := testenv.StartIn(env, "meshturbo-xds", exec.Command(filepath.Join(binDir, "meshturbo-xds"), "-config", cfgPath),
		testenv.HTTPProbe("http://"+admin+"/readyz", nil), 30*time.Second); err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting istiod (config source xds://%s)", mcp)
	istiod, err := testenv.StartIstiodIn(env, deps, mcp)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}

	done = step(ctx, "starting the Envoy sidecar through meshturbo-upgrade")
	if _, err := testenv.StartIn(env, "meshturbo-upgrade", exec.Command(filepath.Join(binDir, "meshturbo-upgrade"),
		"-envoy", deps.Envoy, "-istiod", istiod.XDSAddr, "-envoy-admin", envoyAdmin, "-admin", upAdmin,
		"-pod", "demo-client", "-namespace", "default", "-labels", "app=demo-client", "-interception", "none",
		"-service-account", "demo-client", "-ca-dir", caDir, "-work-dir", filepath.Join(env.Dir(), "demo-client")),
		testenv.HTTPProbe("http://"+upAdmin+"/healthz", nil), time.Minute); err != nil {
		return err
	}
	if err := awaitScoped(ctx, envoyAdmin, samples); err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}
	before, err := envoySize(envoyAdmin)
	if err != nil {
		return err
	}

	fmt.Println()
	var rows []row
	var lags []time.Duration
	for _, s := range samples {
		host := hostFor(s)
		for i := range callsPerService {
			hits := fallbackHits(fbAdmin, host, s.port)
			r := call(ctx, host, s.port)
			r.registry, r.via, r.endpoint = s.registry, "sidecar → direct", fmt.Sprintf("%s:%d", s.ip, s.port)
			if fallbackHits(fbAdmin, host, s.port) > hits {
				r.via = "sidecar → fallback (learning)"
			}
			rows = append(rows, r)
			if i == 0 && r.err == nil {
				// The fallback reported the call; wait for the direct path in the sidecar.
				lag, err := awaitDirect(ctx, envoyAdmin, host, s.port, 10*time.Second)
				if err != nil {
					return err
				}
				lags = append(lags, lag)
			}
		}
	}
	// Non-mesh callers: they only read their registry, then call what it says.
	lookups := []struct {
		registry string
		find     func() (string, error)
	}{
		{"consul", func() (string, error) {
			entries, _, err := cc.Health().Service("greeter", "", true, nil)
			if err != nil || len(entries) == 0 {
				return "", fmt.Errorf("greeter not (yet) passing in consul: %v", err)
			}
			return fmt.Sprintf("%s:%d", entries[0].Service.Address, entries[0].Service.Port), nil
		}},
		{"eureka", func() (string, error) { return testenv.EurekaUpInstance(eureka.URL, "GREETER") }},
	}
	for _, l := range lookups {
		r := callNonMesh(ctx, l.find, 30*time.Second)
		r.service, r.registry, r.via = "greeter", l.registry+" (reverse)", "non-mesh client, direct"
		rows = append(rows, r)
	}
	printTable(os.Stdout, rows)
	for _, r := range rows {
		if r.err != nil {
			return fmt.Errorf("call to %s failed: %w", r.service, r.err)
		}
	}
	after, err := envoySize(envoyAdmin)
	if err != nil {
		return err
	}
	sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
	fmt.Printf("\nlazy loading: the mesh has %d services; the demo client called %d of them.\n", len(samples)+1+others, len(samples))
	fmt.Printf("  each first call went through the fallback; the direct path was in the sidecar %s–%s later\n",
		lags[0].Round(time.Millisecond), lags[len(lags)-1].Round(time.Millisecond))
	fmt.Printf("  sidecar before the first call: %d clusters, %.0f KiB of config (the fallback and a stand-in per service port)\n",
		before.clusters, float64(before.configBytes)/1024)
	fmt.Printf("  sidecar after:                 %d clusters, %.0f KiB (the %d called services replaced their ports' stand-ins;\n",
		after.clusters, float64(after.configBytes)/1024, len(samples))
	fmt.Printf("                                 the other %d services stay out — make bench-lazyload compares with a full sidecar)\n",
		others+1)
	fmt.Printf("  learned edges: meshctl lazyload edges, or GET http://%s/v1/lazyload/edges\n", admin)
	if deps.EnvoyOld != "" {
		fmt.Println()
		if err := upgradeUnderLoad(ctx, upAdmin, deps.EnvoyOld, deps.EnvoyOldVersion, hostFor(samples[0]), samples[0].port); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	fmt.Println()
	return demoAccel(ctx)
}

// upgradeUnderLoad swaps the running sidecar Envoy for another version through meshturbo-upgrade
// while a client keeps calling a service through it, and prints how many calls failed.
func upgradeUnderLoad(ctx context.Context, upAdmin, binary, version, host string, port int) error {
	fmt.Printf("• hot upgrade of the sidecar to Envoy %s while calling %s at ~200 requests/s\n", version, host)
	loadCtx, stopLoad := context.WithCancel(ctx)
	type tally struct{ ok, failed int }
	results := make(chan tally, 1)
	go func() {
		var t tally
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-loadCtx.Done():
				results <- t
				return
			case <-tick.C:
				if r := call(loadCtx, host, port); r.err == nil {
					t.ok++
				} else if loadCtx.Err() == nil {
					t.failed++
				}
			}
		}
	}()
	time.Sleep(time.Second) // load before the upgrade, so the window is covered from both sides
	body := strings.NewReader(fmt.Sprintf(`{"binary": %q}`, binary))
	resp, err := http.Post("http://"+upAdmin+"/v1/upgrade", "application/json", body)
	var res struct {
		Outcome     string `json:"outcome"`
		Error       string `json:"error"`
		FromVersion string `json:"from_version"`
		ToVersion   string `json:"to_version"`
		TotalMS     int64  `json:"total_ms"`
		FromEpoch   int    `json:"from_epoch"`
		ToEpoch     int    `json:"to_epoch"`
	}
	if err == nil {
		err = json.NewDecoder(resp.Body).Decode(&res)
		resp.Body.Close()
	}
	time.Sleep(time.Second) // and after it
	stopLoad()
	t := <-results
	if err != nil {
		return fmt.Errorf("upgrade request: %w", err)
	}
	fmt.Printf("  upgrade %s: epoch %d (Envoy %s) → epoch %d (Envoy %s) in %d ms\n",
		res.Outcome, res.FromEpoch, res.FromVersion, res.ToEpoch, res.ToVersion, res.TotalMS)
	fmt.Printf("  calls during the upgrade window: %d ok, %d failed\n", t.ok, t.failed)
	if res.Outcome != "upgraded" {
		return fmt.Errorf("upgrade %s: %s", res.Outcome, res.Error)
	}
	if t.failed > 0 {
		return fmt.Errorf("%d calls failed during the upgrade", t.failed)
	}
	return ctx.Err()
}

// hostFor is the mesh host name meshturbo gives a sample service.
func hostFor(s *sample) string {
	switch s.registry {
	case "zookeeper":
		return strings.ToLower(s.name) + ".dubbo"
	case "eureka":
		return strings.ToLower(s.name) + ".eureka"
	default:
		return s.name + ".service.consul"
	}
}

// callNonMesh looks the service up as a plain registry client and calls it directly.
func callNonMesh(ctx context.Context, find func() (string, error), within time.Duration) row {
	deadline := time.Now().Add(within)
	for {
		addr, err := find()
		r := row{err: err}
		if err == nil {
			r.endpoint = addr
			client := &http.Client{Timeout: 3 * time.Second}
			start := time.Now()
			resp, err := client.Get("http://" + addr + "/")
			r.latency = time.Since(start)
			if err == nil {
				b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
				resp.Body.Close()
				r.status, r.body, r.err = resp.StatusCode, strings.TrimSpace(string(b)), nil
				if resp.StatusCode == http.StatusOK {
					return r
				}
				r.err = fmt.Errorf("HTTP %d", resp.StatusCode)
			} else {
				r.err = err
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return r
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

type row struct {
	service, registry, via, endpoint, body string
	status                                 int
	latency                                time.Duration
	err                                    error
}

// call makes one request the way an app with no interception does: to the service port on
// 127.0.0.1, where the sidecar listens, with the service's host name.
func call(ctx context.Context, host string, port int) row {
	r := row{service: host}
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", port))
		},
	}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s:%d/", host, port), nil)
	start := time.Now()
	resp, err := client.Do(req)
	r.latency = time.Since(start)
	if err != nil {
		r.err = err
		return r
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	r.status, r.body = resp.StatusCode, strings.TrimSpace(string(b))
	if resp.StatusCode != http.StatusOK {
		r.err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, r.body)
	}
	return r
}

func printTable(w io.Writer, rows []row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tREGISTRY\tVIA\tENDPOINT\tSTATUS\tLATENCY\tRESPONSE")
	for _, r := range rows {
		status := fmt.Sprint(r.status)
		if r.err != nil && r.status == 0 {
			status = "error"
		}
		body := r.body
		if r.err != nil && body == "" {
			body = r.err.Error()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.service, r.registry, r.via, r.endpoint, status,
			r.latency.Round(10*time.Microsecond), body)
	}
	tw.Flush()
	lat := map[string][]time.Duration{}
	for _, r := range rows {
		if r.err == nil {
			lat[r.service] = append(lat[r.service], r.latency)
		}
	}
	names := make([]string, 0, len(lat))
	for n := range lat {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w)
	for _, n := range names {
		l := lat[n]
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		fmt.Fprintf(w, "%s: %d/%d calls ok, median latency %s\n", n, len(l), countFor(rows, n), l[len(l)/2].Round(10*time.Microsecond))
	}
}

func countFor(rows []row, service string) int {
	n := 0
	for _, r := range rows {
		if r.service == service {
			n++
		}
	}
	return n
}

// writeMeshCA creates the mesh CA the sidecar and the lazy-load fallback share.
func writeMeshCA(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := hotupgrade.NewCA("cluster.local")
	if err != nil {
		return err
	}
	return ca.Write(dir)
}

// adminGet reads an Envoy admin page.
func adminGet(ctx context.Context, addr, path string) (string, error) {
	return testenv.AdminGet(ctx, addr, path)
}

// await polls check until it passes, within passes or ctx ends.
func await(ctx context.Context, within time.Duration, what string, check func() error) (time.Duration, error) {
	start := time.Now()
	for {
		err := check()
		if err == nil {
			return time.Since(start), nil
		}
		if time.Since(start) > within || ctx.Err() != nil {
			return 0, fmt.Errorf("%s: not within %s: %w", what, within, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// awaitScoped waits until the lazy-loaded sidecar can take a first call to every sample: a
// listener on each sample port and the fallback cluster.
func awaitScoped(ctx context.Context, envoyAdmin string, samples []*sample) error {
	_, err := await(ctx, time.Minute, "the sidecar's first config (the lazy-load fallback)", func() error {
		clusters, err := adminGet(ctx, envoyAdmin, "/clusters")
		if err != nil {
			return err
		}
		listeners, err := adminGet(ctx, envoyAdmin, "/listeners")
		if err != nil {
			return err
		}
		if !strings.Contains(clusters, "||meshturbo-fallback.meshturbo.internal::") {
			return fmt.Errorf("no fallback cluster")
		}
		for _, s := range samples {
			if !strings.Contains(listeners, fmt.Sprintf("127.0.0.1:%d", s.port)) {
				return fmt.Errorf("no listener on port %d", s.port)
			}
		}
		return nil
	})
	return err
}

// awaitDirect waits until the sidecar has its own cluster for host:port.
func awaitDirect(ctx context.Context, envoyAdmin, host string, port int, within time.Duration) (time.Duration, error) {
	return await(ctx, within, "the direct path to "+host, func() error {
		clusters, err := adminGet(ctx, envoyAdmin, "/clusters")
		if err != nil {
			return err
		}
		if !strings.Contains(clusters, fmt.Sprintf("outbound|%d||%s::", port, host)) {
			return fmt.Errorf("no cluster outbound|%d||%s yet", port, host)
		}
		return nil
	})
}

// fallbackHits is how many requests the fallback forwarded to host:port.
func fallbackHits(fbAdmin, host string, port int) int {
	name := fmt.Sprintf("cluster.lazy|%d|%s.upstream_rq_total", port, host)
	body, err := adminGet(context.Background(), fbAdmin, "/stats?filter="+url.QueryEscape("^"+regexp.QuoteMeta(name)+"$"))
	if err != nil {
		return 0
	}
	_, v, _ := strings.Cut(strings.TrimSpace(body), ": ")
	n, _ := strconv.Atoi(v)
	return n
}

type configSize struct{ clusters, configBytes int }

// envoySize is the sidecar's cluster count and config size.
func envoySize(envoyAdmin string) (configSize, error) {
	var s configSize
	clusters, err := adminGet(context.Background(), envoyAdmin, "/clusters")
	if err != nil {
		return s, err
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(clusters, "\n") {
		if name, _, ok := strings.Cut(line, "::"); ok {
			seen[name] = true
		}
	}
	dump, err := adminGet(context.Background(), envoyAdmin, "/config_dump?include_eds")
	if err != nil {
		return s, err
	}
	return configSize{clusters: len(seen), configBytes: len(dump)}, nil
}
