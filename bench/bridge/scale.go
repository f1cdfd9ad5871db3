package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"
	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// scaleTarget is one registry in the scale run: how to fill it, how to edit it, and the
// meshturbo-xds source block that bridges it.
type scaleTarget struct {
	name string
	// source is the YAML of meshturbo-xds's only source.
	source string
	// load fills the registry with services × instances.
	load func(services, instances int) error
	// settle, if set, waits after the load until the registry is in its steady state.
	settle func() error
	// edit adds instance number i (counting from 0, distinct from the loaded ones) to service svc.
	edit func(i, svc int) error
	// done, if set, releases what edit holds.
	done func()
}

// scaleResult is what the scale run measured for one registry.
type scaleResult struct {
	load, sync     time.Duration
	syncCPU        float64 // cores, from meshturbo-xds's start until it serves every service
	steadyCPU      float64 // cores at 10 edits/s
	idleCPU        float64
	rss            int // MiB, after the steady and idle phases
	peakRSS        int // MiB, VmHWM
	changedPerEdit int
	editLatency    time.Duration // the one edit, registry write → ServiceEntry served to istiod
	serviceEntries int
}

// runScale loads one registry, then starts a meshturbo-xds that bridges only that registry,
// with an istiod reading it, and measures them. Both are stopped at the end, and so is the
// registry (stop), so that the next registry's run has the machine to itself.
func runScale(env *testenv.Env, deps testenv.Deps, bin string, o options, t scaleTarget, stop func() error) (scaleResult, error) {
	var res scaleResult
	fmt.Printf("scale %s: loading %d services / %d instances ...\n", t.name, o.services, o.instances)
	start := time.Now()
	if err := t.load(o.services, o.instances); err != nil {
		return res, fmt.Errorf("scale %s: load: %w", t.name, err)
	}
	res.load = time.Since(start)
	fmt.Printf("scale %s: loaded in %s\n", t.name, res.load.Round(100*time.Millisecond))
	if t.settle != nil {
		if err := t.settle(); err != nil {
			return res, fmt.Errorf("scale %s: %w", t.name, err)
		}
	}

	ports, err := testenv.FreeLoopbackPorts(2)
	if err != nil {
		return res, err
	}
	mcp, admin := testenv.Addr(ports[0]), testenv.Addr(ports[1])
	cfgPath := filepath.Join(env.Dir(), "meshturbo-xds-"+t.name+".yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf("listen: %s\nadmin: {listen: %s}\nsources:\n- %s\n", mcp, admin, t.source)), 0o644); err != nil {
		return res, err
	}
	cmd := exec.Command(filepath.Join(bin, "meshturbo-xds"), "-config", cfgPath, "-log-level", "info")
	if o.memLimit != "" {
		// As a Deployment would set it from its memory limit.
		cmd.Env = append(os.Environ(), "GOMEMLIMIT="+o.memLimit)
	}
	// Ready once the MCP port listens: the sync is timed below, with istiod connected.
	xds, err := testenv.StartIn(env, "meshturbo-xds-"+t.name, cmd, testenv.DialProbe(mcp), time.Minute)
	if err != nil {
		return res, err
	}
	defer xds.Stop()
	pid := xds.Pid()
	cpu0, started := cpuSeconds(pid), time.Now()
	istiod, err := testenv.StartIstiodIn(env, deps, mcp)
	if err != nil {
		return res, err
	}
	defer istiod.Stop()
	want := o.services
	if err := awaitServiceEntries(admin, want, 10*time.Minute); err != nil {
		return res, fmt.Errorf("scale %s: %w", t.name, err)
	}
	res.sync = time.Since(started)
	res.syncCPU = (cpuSeconds(pid) - cpu0) / res.sync.Seconds()
	v, err := serviceEntryVersions(admin)
	if err != nil {
		return res, err
	}
	res.serviceEntries = len(v.Resources)
	fmt.Printf("scale %s: meshturbo-xds serves %d ServiceEntries %s after its start; CPU while syncing %.2f cores\n",
		t.name, res.serviceEntries, res.sync.Round(time.Millisecond), res.syncCPU)
	if err := awaitStable(admin, 2*time.Second, 2*time.Minute); err != nil {
		return res, fmt.Errorf("scale %s: %w", t.name, err)
	}

	// Steady state: one edit every 100ms for 10s, each to another service.
	preSteady, err := serviceEntryVersions(admin)
	if err != nil {
		return res, err
	}
	cpu0, wall0 := cpuSeconds(pid), time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	for i := range 100 {
		if err := t.edit(i, i%o.services); err != nil {
			tick.Stop()
			return res, fmt.Errorf("scale %s: edit %d: %w", t.name, i, err)
		}
		<-tick.C
	}
	tick.Stop()
	res.steadyCPU = (cpuSeconds(pid) - cpu0) / time.Since(wall0).Seconds()
	// Every edited service's ServiceEntry has moved (a quiet period alone can end early: the
	// bridge rests between large builds, see bridge.Pace), then nothing moves for a while.
	if err := awaitChanged(admin, preSteady, min(100, o.services), time.Minute); err != nil {
		return res, fmt.Errorf("scale %s: steady edits: %w", t.name, err)
	}
	if err := awaitStable(admin, 2*time.Second, time.Minute); err != nil {
		return res, fmt.Errorf("scale %s: %w", t.name, err)
	}
	cpu0, wall0 = cpuSeconds(pid), time.Now()
	time.Sleep(10 * time.Second) // the measurement window
	res.idleCPU = (cpuSeconds(pid) - cpu0) / time.Since(wall0).Seconds()
	res.rss, res.peakRSS = rssMiB(pid), peakRSSMiB(pid)

	// One endpoint change: exactly one ServiceEntry version moves.
	before, err := serviceEntryVersions(admin)
	if err != nil {
		return res, err
	}
	edited := time.Now()
	if err := t.edit(1000, 1); err != nil {
		return res, fmt.Errorf("scale %s: one edit: %w", t.name, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		after, err := serviceEntryVersions(admin)
		if err != nil {
			return res, err
		}
		res.changedPerEdit = diffCount(before, after)
		if res.changedPerEdit > 0 || time.Now().After(deadline) {
			res.editLatency = time.Since(edited)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Anything else the edit moves shows within the next quiet period.
	if err := awaitStable(admin, 2*time.Second, time.Minute); err != nil {
		return res, fmt.Errorf("scale %s: %w", t.name, err)
	}
	if after, err := serviceEntryVersions(admin); err == nil {
		res.changedPerEdit = diffCount(before, after)
	}
	fmt.Printf("scale %s: steady CPU %.2f cores (10 edits/s), idle CPU %.3f cores, RSS %d MiB (peak %d), one edit changed %d ServiceEntries, served %s after the write\n",
		t.name, res.steadyCPU, res.idleCPU, res.rss, res.peakRSS, res.changedPerEdit, res.editLatency.Round(time.Millisecond))

	err = errors.Join(istiod.Stop(), xds.Stop())
	if t.done != nil {
		t.done()
	}
	if stop != nil {
		err = errors.Join(err, stop())
	}
	return res, err
}

// awaitChanged waits until at least n ServiceEntries differ from before.
func awaitChanged(admin string, before seVersions, n int, within time.Duration) error {
	deadline := time.Now().Add(within)
	got := 0
	for time.Now().Before(deadline) {
		v, err := serviceEntryVersions(admin)
		if err != nil {
			return err
		}
		if got = diffCount(before, v); got >= n {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%d ServiceEntries changed, want %d within %s", got, n, within)
}

// consulTarget is Consul: services on synthetic nodes, as many agents would register them.
func consulTarget(cc *api.Client, addr string) scaleTarget {
	return scaleTarget{
		name:   "consul",
		source: fmt.Sprintf("consul: {address: %s}", addr),
		load:   func(s, i int) error { return loadConsul(cc, s, i) },
		edit: func(i, svc int) error {
			return cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: fmt.Sprintf("edit-%d", i), Name: fmt.Sprintf("svc-%d", svc),
				Address: fmt.Sprintf("10.200.%d.%d", i/250, i%250+1), Port: 8080})
		},
	}
}

// scaleIface is the Dubbo interface of scale service n.
func scaleIface(n int) string { return fmt.Sprintf("org.bench.scale.Service%d", n) }

// dubboProviderNode is the znode name a Dubbo 2.7/3 provider registers: its URL, percent-encoded
// as a whole, with the parameters real providers carry.
func dubboProviderNode(iface, ip string, port int) string {
	u := fmt.Sprintf("dubbo://%s:%d/%s?anyhost=true&application=%s&deprecated=false&dubbo=2.0.2&dynamic=true&generic=false"+
		"&interface=%s&methods=get,list,put,remove&pid=4242&release=3.2.10&service-name-mapping=true&side=provider"+
		"&timestamp=1700000000000&version=1.0.0",
		ip, port, iface, strings.ToLower(strings.ReplaceAll(iface, ".", "-")), iface)
	return url.QueryEscape(u)
}

// zkTarget is ZooKeeper in the Dubbo layout: /dubbo/<iface>/providers/<URL>, written with
// multi operations (many creates in one request and one transaction log write).
func zkTarget(addr string) scaleTarget {
	var conn *zk.Conn // one session for every edit, as a provider application has
	return scaleTarget{
		done: func() {
			if conn != nil {
				conn.Close()
			}
		},
		name:   "zk",
		source: fmt.Sprintf("zookeeper: {servers: [%s]}", addr),
		load:   func(s, i int) error { return loadZooKeeper(addr, s, i) },
		edit: func(i, svc int) error {
			if conn == nil {
				var err error
				if conn, _, err = zk.Connect([]string{addr}, 10*time.Second, zk.WithLogInfo(false)); err != nil {
					return err
				}
			}
			p := "/dubbo/" + scaleIface(svc) + "/providers/" + dubboProviderNode(scaleIface(svc), fmt.Sprintf("10.200.%d.%d", i/250, i%250+1), 20880)
			_, err := conn.Create(p, nil, 0, zk.WorldACL(zk.PermAll))
			return err
		},
	}
}

// loadZooKeeper creates the Dubbo tree: per interface its directory and providers node, then
// the providers, in multi requests of up to 500 creates (about 200 KiB, well under
// jute.maxbuffer) from four connections.
func loadZooKeeper(addr string, services, instances int) error {
	const perMulti, workers = 500, 4
	conns := make([]*zk.Conn, workers)
	for i := range conns {
		c, _, err := zk.Connect([]string{addr}, 30*time.Second, zk.WithLogInfo(false))
		if err != nil {
			return fmt.Errorf("zookeeper %s: %w", addr, err)
		}
		defer c.Close()
		conns[i] = c
	}
	acl := zk.WorldACL(zk.PermAll)
	if _, err := conns[0].Create("/dubbo", nil, 0, acl); err != nil && !errors.Is(err, zk.ErrNodeExists) {
		return fmt.Errorf("create /dubbo: %w", err)
	}
	// Directories first (a create needs its parent), then providers.
	run := func(paths func(emit func(string))) error {
		batches := make(chan []any)
		errs := make(chan error, workers)
		for w := range workers {
			go func() {
				var first error
				for ops := range batches {
					if first == nil {
						if _, err := conns[w].Multi(ops...); err != nil {
							first = fmt.Errorf("zookeeper multi of %d creates: %w", len(ops), err)
						}
					}
				}
				errs <- first
			}()
		}
		var ops []any
		paths(func(p string) {
			ops = append(ops, &zk.CreateRequest{Path: p, Acl: acl})
			if len(ops) == perMulti {
				batches <- ops
				ops = nil
			}
		})
		if len(ops) > 0 {
			batches <- ops
		}
		close(batches)
		var err error
		for range workers {
			err = errors.Join(err, <-errs)
		}
		return err
	}
	if err := run(func(emit func(string)) {
		for s := range services {
			emit("/dubbo/" + scaleIface(s))
		}
	}); err != nil {
		return err
	}
	if err := run(func(emit func(string)) {
		for s := range services {
			emit("/dubbo/" + scaleIface(s) + "/providers")
		}
	}); err != nil {
		return err
	}
	return run(func(emit func(string)) {
		for i := range instances {
			s := i % services
			emit("/dubbo/" + scaleIface(s) + "/providers/" + dubboProviderNode(scaleIface(s), scaleIP(i), 20880))
		}
	})
}

// scaleIP is the address of loaded instance i.
func scaleIP(i int) string { return fmt.Sprintf("10.%d.%d.%d", 10+i/62500, (i/250)%250, i%250+1) }

// eurekaTarget is Eureka: instances registered through its REST API, as Spring Cloud
// services register themselves.
func eurekaTarget(base string) scaleTarget {
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: time.Minute}
	return scaleTarget{
		name:   "eureka",
		source: fmt.Sprintf("eureka: {urls: [%s], pollInterval: 250ms}", base),
		load:   func(s, i int) error { return loadEureka(hc, base, s, i) },
		settle: func() error { return awaitEurekaDeltaDrained(hc, base, 5*time.Minute) },
		edit: func(i, svc int) error {
			return registerEureka(hc, base, fmt.Sprintf("SCALE-%d", svc), fmt.Sprintf("edit-%d", i),
				fmt.Sprintf("10.200.%d.%d", i/250, i%250+1), 8080)
		},
	}
}

// loadEureka registers every instance with POST /apps/<APP>, 32 at a time. The server's
// registry lock and response-cache invalidation make each registration cost a little
// server CPU, so the rate is what the Eureka server can take on this machine.
func loadEureka(hc *http.Client, base string, services, instances int) error {
	const workers = 32
	next := make(chan int)
	var (
		mu    sync.Mutex
		first error
	)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range next {
				mu.Lock()
				failed := first != nil
				mu.Unlock()
				if failed {
					continue
				}
				if err := registerEureka(hc, base, fmt.Sprintf("SCALE-%d", i%services), fmt.Sprintf("i-%d", i), scaleIP(i), 8080); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		})
	}
	lastReport := time.Now()
	for i := range instances {
		next <- i
		if time.Since(lastReport) > 30*time.Second {
			fmt.Printf("scale eureka: %d instances registered\n", i)
			lastReport = time.Now()
		}
	}
	close(next)
	wg.Wait()
	return first
}

// registerEureka registers one UP instance with a lease long enough never to expire in the
// benchmark.
func registerEureka(hc *http.Client, base, app, id, ip string, port int) error {
	body := fmt.Sprintf(`{"instance":{"instanceId":%q,"hostName":%q,"app":%q,"ipAddr":%q,"status":"UP",`+
		`"port":{"$":%d,"@enabled":"true"},"securePort":{"$":443,"@enabled":"false"},"vipAddress":%q,`+
		`"dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},`+
		`"leaseInfo":{"renewalIntervalInSecs":3600,"durationInSecs":36000},"metadata":{"protocol":"http"}}}`,
		id, ip, app, ip, port, strings.ToLower(app))
	req, err := http.NewRequest(http.MethodPost, base+"/apps/"+app, bytes.NewBufferString(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("eureka register %s/%s: %w", app, id, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("eureka register %s/%s: %s", app, id, resp.Status)
	}
	return nil
}

// awaitEurekaDeltaDrained waits until GET /apps/delta no longer carries the bulk load. Eureka
// keeps every change in its delta queue for eureka.server.retention-time-in-m-s-in-delta-queue
// (3 minutes by default; the benchmark's server keeps 30 s); right after loading 100,000
// instances each delta is the whole registry, which no real registry's steady state looks like.
func awaitEurekaDeltaDrained(hc *http.Client, base string, within time.Duration) error {
	start := time.Now()
	last := int64(-1)
	for time.Since(start) < within {
		req, _ := http.NewRequest(http.MethodGet, base+"/apps/delta", nil)
		req.Header.Set("Accept", "application/json")
		resp, err := hc.Do(req)
		if err == nil {
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			last = n
			if resp.StatusCode == 200 && n < 64<<10 {
				fmt.Printf("scale eureka: delta queue drained %s after the load\n", time.Since(start).Round(time.Second))
				return nil
			}
		}
		time.Sleep(2 * time.Second)
	}
	return fmt.Errorf("eureka /apps/delta still %d bytes %s after the load; check eureka.server.retention-time-in-m-s-in-delta-queue", last, within)
}
