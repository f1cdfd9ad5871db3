// Command bridge is `make bench-bridge`. It measures, with the real Consul, istiod and Envoy
// from `make deps`:
//
//   - propagation: a registry write until the Envoy sidecar holds the endpoint (its cluster's
//     membership_total), p50/p99 over many writes;
//   - scale, for each registry in turn (-scale consul,zk,eureka): the registry filled with S
//     services and I instances (Consul: catalog transactions on synthetic nodes; ZooKeeper: the
//     Dubbo provider layout written with multi requests; Eureka: registrations through its REST
//     API), then a meshturbo-xds bridging only that registry, with an istiod reading it: how long
//     it takes to serve every service and its CPU meanwhile, its CPU at 10 edits/s and idle,
//     its RSS, and how many ServiceEntries one endpoint change touches. The registry is stopped
//     after its run, so that each run has the machine to itself.
//
// It ends with the line `bench-bridge: consul_p99_ms=… zk_p99_ms=… eureka_p99_ms=… cpu_cores=…
// rss_mib=… changed_per_edit=…`, the scale figures being the worst registry's, followed by
// each registry's own (consul_cpu_cores=… consul_idle_cores=… consul_rss_mib=… consul_sync_s=…
// consul_load_s=… consul_changed_per_edit=… consul_edit_ms=…, and the same for zk_ and
// eureka_; edit_ms is the one edit at scale, registry write → ServiceEntry served to istiod).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

type options struct {
	edits     int
	services  int
	instances int
	out       string
	memLimit  string
	scale     string
}

func main() {
	var o options
	flag.IntVar(&o.edits, "edits", 50, "registry writes timed for propagation")
	flag.IntVar(&o.services, "services", 10000, "services in the scale run")
	flag.IntVar(&o.instances, "instances", 100000, "instances in the scale run")
	flag.StringVar(&o.out, "out", "out/bench-bridge", "directory for logs")
	flag.StringVar(&o.memLimit, "gomemlimit", "900MiB", "GOMEMLIMIT for meshturbo-xds (empty: none)")
	flag.StringVar(&o.scale, "scale", "consul,zk,eureka", "registries to load for the scale run, in order (empty: none)")
	flag.Parse()
	env, err := testenv.NewEnv(o.out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-bridge:", err)
		os.Exit(1)
	}
	err = run(env, o)
	env.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-bridge:", err, "(logs in", env.Dir()+")")
		os.Exit(1)
	}
}

func run(env *testenv.Env, o options) error {
	for _, name := range strings.Split(o.scale, ",") {
		if name = strings.TrimSpace(name); name != "" && name != "consul" && name != "zk" && name != "eureka" {
			return fmt.Errorf("-scale: unknown registry %q (want a list of consul, zk, eureka)", name)
		}
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
	// Heaps for the scale run: 100,000 znodes, 100,000 Eureka instances and their JSON.
	zkSrv, err := testenv.StartZooKeeperWith(env, deps, testenv.ZooKeeperOptions{MaxHeap: "1g"})
	if err != nil {
		return err
	}
	eurekaSrv, err := testenv.StartEurekaWith(env, deps, testenv.EurekaOptions{MaxHeap: "3g", Properties: map[string]string{
		// Keep changes in the delta queue for 30 s rather than 3 min, so that the scale run
		// need not wait as long for the bulk load to leave it (see awaitEurekaDeltaDrained).
		"eureka.server.retention-time-in-m-s-in-delta-queue": "30000",
		"eureka.server.delta-retention-timer-interval-in-ms": "5000",
	}})
	if err != nil {
		return err
	}
	cfg := api.DefaultConfig()
	cfg.Address = consul.HTTPAddr
	cc, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	ports, err := testenv.FreeLoopbackPorts(4)
	if err != nil {
		return err
	}
	mcp, admin, envoyAdmin, upAdmin := testenv.Addr(ports[0]), testenv.Addr(ports[1]), testenv.Addr(ports[2]), testenv.Addr(ports[3])
	cfgPath := filepath.Join(env.Dir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`listen: %s
admin: {listen: %s}
sources:
- consul: {address: %s}
- zookeeper: {servers: [%s]}
- eureka: {urls: [%s], pollInterval: 250ms}
`, mcp, admin, consul.HTTPAddr, zkSrv.Addr, eurekaSrv.URL)), 0o644); err != nil {
		return err
	}
	xdsCmd := exec.Command(filepath.Join(bin, "meshturbo-xds"), "-config", cfgPath, "-log-level", "warn")
	if o.memLimit != "" {
		// As a Deployment would set it from its memory limit.
		xdsCmd.Env = append(os.Environ(), "GOMEMLIMIT="+o.memLimit)
	}
	xdsProc, err := testenv.StartIn(env, "meshturbo-xds", xdsCmd,
		testenv.HTTPProbe("http://"+admin+"/readyz", nil), 30*time.Second)
	if err != nil {
		return err
	}
	istiod, err := testenv.StartIstiodIn(env, deps, mcp)
	if err != nil {
		return err
	}
	sidecar, err := testenv.StartIn(env, "meshturbo-upgrade", exec.Command(filepath.Join(bin, "meshturbo-upgrade"),
		"-envoy", deps.Envoy, "-istiod", istiod.XDSAddr, "-envoy-admin", envoyAdmin, "-admin", upAdmin,
		"-interception", "none", "-concurrency", "1"),
		testenv.HTTPProbe("http://"+upAdmin+"/healthz", nil), time.Minute)
	if err != nil {
		return err
	}

	ip := func(r, i int) string { return fmt.Sprintf("127.%d.%d.%d", 10+r, i/250, i%250+1) }
	registries := []struct {
		name, host string
		port       int
		add        func(i int) error
		remove     func(i int) error
	}{
		{"consul", "bench.service.consul", 18000,
			func(i int) error {
				return cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: fmt.Sprintf("bench-%d", i), Name: "bench",
					Address: ip(0, i), Port: 18000, Meta: map[string]string{"protocol": "http"}})
			},
			func(i int) error { return cc.Agent().ServiceDeregister(fmt.Sprintf("bench-%d", i)) }},
		{"zk", "org.bench.benchservice.dubbo", 18001,
			func(i int) error {
				return testenv.DubboProvider(zkSrv.Addr, "org.bench.BenchService", "rest", ip(1, i), 18001, false)
			},
			func(i int) error {
				return testenv.DubboProvider(zkSrv.Addr, "org.bench.BenchService", "rest", ip(1, i), 18001, true)
			}},
		{"eureka", "bench.eureka", 18002,
			func(i int) error {
				return testenv.EurekaInstance(eurekaSrv.URL, "BENCH", fmt.Sprint("bench-", i), ip(2, i), 18002, false)
			},
			func(i int) error {
				return testenv.EurekaInstance(eurekaSrv.URL, "BENCH", fmt.Sprint("bench-", i), ip(2, i), 18002, true)
			}},
	}
	p99s := map[string]time.Duration{}
	for _, reg := range registries {
		if o.edits == 0 {
			break // -edits 0: the scale run only
		}
		// Istio names the cluster's stats "outbound|<port>||<host>;" (its observability name).
		stat := fmt.Sprintf("cluster.outbound|%d||%s;.membership_total", reg.port, reg.host)
		if err := reg.add(0); err != nil {
			return fmt.Errorf("%s: %w", reg.name, err)
		}
		if _, err := awaitStat(envoyAdmin, stat, 1, 60*time.Second); err != nil {
			return fmt.Errorf("%s: the first instance never reached Envoy: %w", reg.name, err)
		}
		// Each edit adds (odd) or removes (even) one instance; done when Envoy's cluster
		// has the new member count.
		var lat []time.Duration
		members := 1
		for i := 1; i <= o.edits; i++ {
			start := time.Now()
			if i%2 == 1 {
				err, members = reg.add(i), members+1
			} else {
				err, members = reg.remove(i-1), members-1
			}
			if err != nil {
				return fmt.Errorf("%s edit %d: %w", reg.name, i, err)
			}
			if _, err := awaitStat(envoyAdmin, stat, members, 10*time.Second); err != nil {
				return fmt.Errorf("%s edit %d: %w", reg.name, i, err)
			}
			lat = append(lat, time.Since(start))
		}
		p99s[reg.name] = percentile(lat, 99)
		fmt.Printf("%s propagation (registry write → Envoy endpoint), %d edits: p50=%s p99=%s max=%s\n", reg.name,
			len(lat), percentile(lat, 50).Round(time.Millisecond), p99s[reg.name].Round(time.Millisecond), slices.Max(lat).Round(time.Millisecond))
	}

	if err := errors.Join(sidecar.Stop(), istiod.Stop(), xdsProc.Stop()); err != nil {
		return err
	}

	// Scale, one registry at a time, each bridged by its own meshturbo-xds.
	targets := map[string]scaleTarget{
		"consul": consulTarget(cc, consul.HTTPAddr),
		"zk":     zkTarget(zkSrv.Addr),
		"eureka": eurekaTarget(eurekaSrv.URL),
	}
	stops := map[string]func() error{"consul": consul.Stop, "zk": zkSrv.Stop, "eureka": eurekaSrv.Stop}
	results := map[string]scaleResult{}
	var order []string
	for _, name := range strings.Split(o.scale, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		t, ok := targets[name]
		if !ok {
			return fmt.Errorf("-scale: unknown registry %q (want consul, zk, eureka)", name)
		}
		res, err := runScale(env, deps, bin, o, t, stops[name])
		if err != nil {
			return err
		}
		results[name] = res
		order = append(order, name)
	}

	// The summary: the propagation p99s, and for the scale figures the worst registry's
	// (cpu_cores, rss_mib, changed_per_edit), then each registry's own.
	var worst scaleResult
	extra := ""
	for _, name := range order {
		r := results[name]
		worst.steadyCPU = max(worst.steadyCPU, r.steadyCPU)
		worst.rss = max(worst.rss, r.rss)
		if r.changedPerEdit != 1 || worst.changedPerEdit == 0 {
			worst.changedPerEdit = max(worst.changedPerEdit, r.changedPerEdit)
		}
		extra += fmt.Sprintf(" %s_cpu_cores=%.2f %s_idle_cores=%.3f %s_rss_mib=%d %s_sync_s=%.1f %s_load_s=%.0f %s_changed_per_edit=%d %s_edit_ms=%d",
			name, r.steadyCPU, name, r.idleCPU, name, r.rss, name, r.sync.Seconds(), name, r.load.Seconds(), name, r.changedPerEdit,
			name, r.editLatency.Milliseconds())
	}
	fmt.Printf("bench-bridge: consul_p99_ms=%d zk_p99_ms=%d eureka_p99_ms=%d cpu_cores=%.2f rss_mib=%d changed_per_edit=%d%s\n",
		p99s["consul"].Milliseconds(), p99s["zk"].Milliseconds(), p99s["eureka"].Milliseconds(), worst.steadyCPU, worst.rss, worst.changedPerEdit, extra)
	return nil
}

// loadConsul registers services×instances through transactions (64 operations each, four
// in flight) on synthetic nodes, as a large catalog fed by many agents would look.
func loadConsul(cc *api.Client, services, instances int) error {
	const perTxn, workers = 64, 4
	nodes := (instances + 999) / 1000
	for n := range nodes {
		if _, err := cc.Catalog().Register(&api.CatalogRegistration{Node: fmt.Sprintf("node-%d", n),
			Address: fmt.Sprintf("10.100.%d.%d", n/250, n%250+1)}, nil); err != nil {
			return fmt.Errorf("register node: %w", err)
		}
	}
	batches := make(chan api.TxnOps)
	errs := make(chan error, workers)
	for range workers {
		go func() {
			var first error
			for ops := range batches {
				if first != nil {
					continue
				}
				ok, resp, _, err := cc.Txn().Txn(ops, nil)
				switch {
				case err != nil:
					first = fmt.Errorf("consul txn: %w", err)
				case !ok:
					first = fmt.Errorf("consul txn rejected: %v", resp.Errors)
				}
			}
			errs <- first
		}()
	}
	var ops api.TxnOps
	for i := range instances {
		svc := i % services
		n := i / 1000
		ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: fmt.Sprintf("node-%d", n),
			Service: api.AgentService{ID: fmt.Sprintf("i-%d", i), Service: fmt.Sprintf("svc-%d", svc),
				Address: fmt.Sprintf("10.%d.%d.%d", 10+i/62500, (i/250)%250, i%250+1), Port: 8080}}})
		if len(ops) == perTxn || i == instances-1 {
			batches <- ops
			ops = nil
		}
	}
	close(batches)
	var err error
	for range workers {
		err = errors.Join(err, <-errs)
	}
	return err
}

// awaitStat polls an Envoy stat until it equals want.
func awaitStat(envoyAdmin, stat string, want int, within time.Duration) (time.Duration, error) {
	start := time.Now()
	last := "absent"
	for time.Since(start) < within {
		resp, err := http.Get("http://" + envoyAdmin + "/stats?filter=" + regexpQuote(stat))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, line := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(line, ": "); ok && k == stat {
					last = v
					if n, _ := strconv.Atoi(v); n == want {
						return time.Since(start), nil
					}
				}
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, fmt.Errorf("%s = %s, want %d within %s", stat, last, want, within)
}

func regexpQuote(s string) string {
	r := strings.NewReplacer(".", `\.`, "|", `\|`, ";", `;`)
	return "^" + r.Replace(s) + "$"
}

type seVersions struct {
	Version   string            `json:"version"`
	Resources map[string]string `json:"resources"`
}

func serviceEntryVersions(admin string) (seVersions, error) {
	var v seVersions
	err := getJSON("http://"+admin+"/v1/xds/serviceentries", &v)
	return v, err
}

func awaitServiceEntries(admin string, want int, within time.Duration) error {
	deadline := time.Now().Add(within)
	got := 0
	for time.Now().Before(deadline) {
		v, err := serviceEntryVersions(admin)
		if err == nil {
			got = len(v.Resources)
			if got >= want {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("meshturbo-xds serves %d ServiceEntries, want %d within %s", got, want, within)
}

// awaitStable waits until the served version has not changed for quiet.
func awaitStable(admin string, quiet, within time.Duration) error {
	deadline := time.Now().Add(within)
	last, since := "", time.Now()
	for time.Now().Before(deadline) {
		v, err := serviceEntryVersions(admin)
		if err != nil {
			return err
		}
		if v.Version != last {
			last, since = v.Version, time.Now()
		} else if time.Since(since) >= quiet {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("ServiceEntries never settled")
}

func diffCount(a, b seVersions) int {
	n := 0
	for k, v := range b.Resources {
		if a.Resources[k] != v {
			n++
		}
	}
	for k := range a.Resources {
		if _, ok := b.Resources[k]; !ok {
			n++
		}
	}
	return n
}

func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %d %s", url, resp.StatusCode, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
