package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
)

// The chaos tests break one registry under a running mesh (meshturbo-xds → istiod → Envoy)
// and check the whole path: while the registry is gone, Envoy keeps calling the service
// (meshturbo-xds serves its last snapshot; no ServiceEntry changes) and the registry is
// reported stale in /v1/registries and /metrics; once it is back, changes reach Envoy within
// recoveryWithin.

// recoveryWithin is how long a change made after a registry came back may take to be called
// through Envoy (the issue: state correct within 5 s after recovery).
const recoveryWithin = 5 * time.Second

// TestChaosConsulKilled kills Consul with SIGKILL and starts it again. The dev-mode agent
// comes back empty with its index reset, as a Consul whose state was lost would: services
// register again (an agent's anti-entropy does it; here the test), and a new one appears.
func TestChaosConsulKilled(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)
	host, port := startHTTPServer(t, "inventory from consul")
	register(t, cc, "inventory", "inventory-1", host, port)

	mt := startXDS(t, consul.HTTPAddr)
	sc := startSidecar(t, deps.Envoy, testenv.StartIstiod(t, mt.MCPAddr).XDSAddr)
	inventory := fmt.Sprintf("http://inventory.service.consul:%d/", port)
	mustCall(t, sc, inventory, "inventory from consul", time.Minute)

	survivesOutage(t, mt, sc, consul.Process, model.SourceConsul, inventory, "inventory from consul")

	consul.Restart(t)
	back := time.Now()
	register(t, cc, "inventory", "inventory-1", host, port)
	pHost, pPort := startHTTPServer(t, "payments from consul")
	register(t, cc, "payments", "payments-1", pHost, pPort)
	mustCall(t, sc, fmt.Sprintf("http://payments.service.consul:%d/", pPort), "payments from consul", recoveryWithin)
	mustCall(t, sc, inventory, "inventory from consul", recoveryWithin)
	awaitFresh(t, mt, model.SourceConsul)
	t.Logf("consul restarted empty: a new service and the re-registered one answer through Envoy %s after it was back",
		time.Since(back).Round(time.Millisecond))
}

// TestChaosZooKeeperKilled kills ZooKeeper with SIGKILL and starts it again on its data
// directory (znodes survive, as in any real ensemble). Next to the good provider sits a
// malformed one, which is skipped with its reason throughout.
func TestChaosZooKeeperKilled(t *testing.T) {
	deps := testenv.RequireDeps(t)
	zkSrv := testenv.StartZooKeeper(t)
	host, port := startHTTPServer(t, "prices from dubbo")
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.PriceService", "rest", host, port, false); err != nil {
		t.Fatal(err)
	}
	// A provider registered by host name: Istio STATIC endpoints need IP addresses.
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.BrokenService", "rest", "db.example.com", 8080, false); err != nil {
		t.Fatal(err)
	}

	mt := startXDSWith(t, "-zookeeper", zkSrv.Addr)
	sc := startSidecar(t, deps.Envoy, testenv.StartIstiod(t, mt.MCPAddr).XDSAddr)
	prices := fmt.Sprintf("http://org.example.priceservice.dubbo:%d/", port)
	mustCall(t, sc, prices, "prices from dubbo", time.Minute)
	assertSkipped(t, mt, model.SourceZooKeeper, "BrokenService", "bad-host", "bad_address")

	survivesOutage(t, mt, sc, zkSrv.Process, model.SourceZooKeeper, prices, "prices from dubbo")

	zkSrv.Restart(t)
	back := time.Now()
	sHost, sPort := startHTTPServer(t, "stock from dubbo")
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.StockService", "rest", sHost, sPort, false); err != nil {
		t.Fatal(err)
	}
	mustCall(t, sc, fmt.Sprintf("http://org.example.stockservice.dubbo:%d/", sPort), "stock from dubbo", recoveryWithin)
	mustCall(t, sc, prices, "prices from dubbo", recoveryWithin)
	awaitFresh(t, mt, model.SourceZooKeeper)
	assertSkipped(t, mt, model.SourceZooKeeper, "BrokenService", "bad-host", "bad_address")
	t.Logf("zookeeper back: a provider registered after the restart answers through Envoy %s later", time.Since(back).Round(time.Millisecond))
}

// TestChaosZooKeeperSessionExpired partitions meshturbo-xds from ZooKeeper (both keep
// running) until the server expires its session, and changes the registry meanwhile: a
// provider leaves, a new interface appears. meshturbo-xds serves its last snapshot
// throughout, never a gap; once the partition heals it lists everything again in a new
// session, and both changes reach Envoy.
func TestChaosZooKeeperSessionExpired(t *testing.T) {
	deps := testenv.RequireDeps(t)
	zkSrv := testenv.StartZooKeeper(t)
	keepHost, keepPort := startHTTPServer(t, "prices from dubbo")
	goneHost, gonePort := startHTTPServer(t, "legacy from dubbo")
	for _, p := range []struct {
		iface, host string
		port        int
	}{{"org.example.PriceService", keepHost, keepPort}, {"org.example.LegacyService", goneHost, gonePort}} {
		if err := testenv.DubboProvider(zkSrv.Addr, p.iface, "rest", p.host, p.port, false); err != nil {
			t.Fatal(err)
		}
	}
	proxy := testenv.StartTCPProxy(t, zkSrv.Addr)
	// The shortest session the test server grants (2 ticks), so that it expires quickly.
	cfg := filepath.Join(t.TempDir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("sources:\n- zookeeper: {servers: [%s], sessionTimeout: 1s}\n", proxy.Addr)), 0o644); err != nil {
		t.Fatal(err)
	}
	mt := startXDSWith(t, "-config", cfg)
	sc := startSidecar(t, deps.Envoy, testenv.StartIstiod(t, mt.MCPAddr).XDSAddr)
	prices := fmt.Sprintf("http://org.example.priceservice.dubbo:%d/", keepPort)
	legacy := fmt.Sprintf("http://org.example.legacyservice.dubbo:%d/", gonePort)
	mustCall(t, sc, prices, "prices from dubbo", time.Minute)
	mustCall(t, sc, legacy, "legacy from dubbo", 10*time.Second)
	sessions := zkSessions(t, zkSrv.Addr)
	before := serviceEntries(t, mt.AdminAddr)

	proxy.Cut()
	awaitSource(t, mt.AdminAddr, model.SourceZooKeeper, 10*time.Second, "reported stale after the partition",
		func(s bridge.SourceStatus) bool { return s.Stale })
	awaitSessionsGone(t, zkSrv.Addr, sessions)
	// Changes meshturbo-xds cannot see yet.
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.LegacyService", "rest", goneHost, gonePort, true); err != nil {
		t.Fatal(err)
	}
	sHost, sPort := startHTTPServer(t, "stock from dubbo")
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.StockService", "rest", sHost, sPort, false); err != nil {
		t.Fatal(err)
	}
	callsSucceed(t, sc, prices, "prices from dubbo")
	callsSucceed(t, sc, legacy, "legacy from dubbo") // the last snapshot still has it
	if after := serviceEntries(t, mt.AdminAddr); !maps.Equal(before, after) {
		t.Fatalf("ServiceEntries changed while the session was gone:\nbefore %v\nafter  %v", before, after)
	}

	proxy.Restore()
	healed := time.Now()
	mustCall(t, sc, fmt.Sprintf("http://org.example.stockservice.dubbo:%d/", sPort), "stock from dubbo", recoveryWithin)
	// The emptied service is kept (retention) with no endpoints: Envoy answers "no healthy upstream".
	if _, err := sc.awaitCall(legacy, recoveryWithin, "removal of the provider deleted during the partition", func(code int, body string) bool {
		return code == 503 && strings.Contains(body, "no healthy upstream")
	}); err != nil {
		t.Fatal(err)
	}
	callsSucceed(t, sc, prices, "prices from dubbo")
	awaitFresh(t, mt, model.SourceZooKeeper)
	if !strings.Contains(mt.Tail(400), "zookeeper session expired") {
		t.Error("meshturbo-xds did not log the expired session")
	}
	t.Logf("session expired and recovered: both changes reached Envoy %s after the partition healed", time.Since(healed).Round(time.Millisecond))
}

// TestChaosEurekaKilled kills Eureka with SIGKILL and starts it again. Eureka keeps its
// registry in memory, so it comes back empty, and its clients register again (they get 404
// on their next heartbeat); here the test does. Next to the good app sits an instance whose
// address is no IP, skipped with its reason.
func TestChaosEurekaKilled(t *testing.T) {
	deps := testenv.RequireDeps(t)
	eureka := testenv.StartEureka(t)
	host, port := startHTTPServer(t, "orders from eureka")
	if err := testenv.EurekaInstance(eureka.URL, "ORDERS", "orders-1", host, port, false); err != nil {
		t.Fatal(err)
	}
	if err := testenv.EurekaInstance(eureka.URL, "BROKEN", "broken-1", "not-an-ip", 8080, false); err != nil {
		t.Fatal(err)
	}

	mt := startXDSWith(t, "-eureka", eureka.URL)
	sc := startSidecar(t, deps.Envoy, testenv.StartIstiod(t, mt.MCPAddr).XDSAddr)
	orders := fmt.Sprintf("http://orders.eureka:%d/", port)
	mustCall(t, sc, orders, "orders from eureka", time.Minute)
	assertSkipped(t, mt, model.SourceEureka, "broken-1", "bad ip address", "bad_address")

	survivesOutage(t, mt, sc, eureka.Process, model.SourceEureka, orders, "orders from eureka")

	eureka.Restart(t)
	back := time.Now()
	if err := testenv.EurekaInstance(eureka.URL, "ORDERS", "orders-1", host, port, false); err != nil {
		t.Fatal(err)
	}
	sHost, sPort := startHTTPServer(t, "shipping from eureka")
	if err := testenv.EurekaInstance(eureka.URL, "SHIPPING", "shipping-1", sHost, sPort, false); err != nil {
		t.Fatal(err)
	}
	mustCall(t, sc, fmt.Sprintf("http://shipping.eureka:%d/", sPort), "shipping from eureka", recoveryWithin)
	mustCall(t, sc, orders, "orders from eureka", recoveryWithin)
	awaitFresh(t, mt, model.SourceEureka)
	t.Logf("eureka restarted empty: a new app and the re-registered one answer through Envoy %s after it was back",
		time.Since(back).Round(time.Millisecond))
}

// TestChaosEurekaFaults puts a proxy in front of Eureka that first answers every request
// with 503 (an overloaded or failing node), then serves deltas whose apps__hashcode does not
// match (a cache or proxy serving an inconsistent view). The 5xx replies change nothing but
// staleness; with the bad hashes, each delta is discarded for a full fetch, and a change
// still reaches Envoy within recoveryWithin.
func TestChaosEurekaFaults(t *testing.T) {
	deps := testenv.RequireDeps(t)
	eureka := testenv.StartEureka(t)
	host, port := startHTTPServer(t, "orders from eureka")
	if err := testenv.EurekaInstance(eureka.URL, "ORDERS", "orders-1", host, port, false); err != nil {
		t.Fatal(err)
	}
	faults := newEurekaFaults(t, eureka.URL)
	mt := startXDSWith(t, "-eureka", faults.url)
	sc := startSidecar(t, deps.Envoy, testenv.StartIstiod(t, mt.MCPAddr).XDSAddr)
	orders := fmt.Sprintf("http://orders.eureka:%d/", port)
	mustCall(t, sc, orders, "orders from eureka", time.Minute)

	outage(t, mt, sc, model.SourceEureka, "eureka answering 503", func() { faults.mode.Store(fault503) }, orders, "orders from eureka")

	faults.mode.Store(faultBadHash)
	awaitFresh(t, mt, model.SourceEureka)
	// The first fetch after a failure is a full one; the next change comes in a delta,
	// whose hash does not match.
	sHost, sPort := startHTTPServer(t, "shipping from eureka")
	if err := testenv.EurekaInstance(eureka.URL, "SHIPPING", "shipping-1", sHost, sPort, false); err != nil {
		t.Fatal(err)
	}
	registered := time.Now()
	mustCall(t, sc, fmt.Sprintf("http://shipping.eureka:%d/", sPort), "shipping from eureka", recoveryWithin)
	t.Logf("with mismatching delta hashes, a new app answered through Envoy %s after it registered", time.Since(registered).Round(time.Millisecond))
	if faults.badHashes.Load() == 0 {
		t.Fatal("no delta with a bad hash was served: the test did not exercise the mismatch")
	}
	if !strings.Contains(mt.Tail(400), "does not match the registry's hash code") {
		t.Error("meshturbo-xds did not log the hash mismatch")
	}
	callsSucceed(t, sc, orders, "orders from eureka")
}

const (
	faultNone int32 = iota
	fault503
	faultBadHash
)

// eurekaFaults is a reverse proxy to Eureka that can fail on demand.
type eurekaFaults struct {
	url       string // the proxy's Eureka base URL
	mode      atomic.Int32
	badHashes atomic.Int64 // deltas served with a wrong hash
}

var hashRE = regexp.MustCompile(`"apps__hashcode"\s*:\s*"[^"]*"`)

func newEurekaFaults(t *testing.T, base string) *eurekaFaults {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	f := &eurekaFaults{}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: u.Scheme, Host: u.Host})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch f.mode.Load() {
		case fault503:
			http.Error(w, "eureka overloaded (fault injected by the test)", http.StatusServiceUnavailable)
		case faultBadHash:
			if !strings.HasSuffix(r.URL.Path, "/apps/delta") {
				rp.ServeHTTP(w, r)
				return
			}
			r.Header.Del("Accept-Encoding") // plain JSON, to rewrite
			rec := httptest.NewRecorder()
			rp.ServeHTTP(rec, r)
			body := rec.Body.Bytes()
			if rec.Code == http.StatusOK && hashRE.Match(body) {
				body = hashRE.ReplaceAll(body, []byte(`"apps__hashcode":"UP_999_"`))
				f.badHashes.Add(1)
			}
			for k, v := range rec.Header() {
				if k != "Content-Length" {
					w.Header()[k] = v
				}
			}
			w.WriteHeader(rec.Code)
			w.Write(body)
		default:
			rp.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	f.url = srv.URL + u.Path
	return f
}

// survivesOutage kills the registry's process and checks what outage checks.
func survivesOutage(t *testing.T, mt *xdsDaemon, sc *sidecar, registry *testenv.Process, src model.Source, target, want string) {
	t.Helper()
	outage(t, mt, sc, src, registry.Name+" killed", func() {
		if err := registry.Signal(syscall.SIGKILL); err != nil {
			t.Fatalf("kill %s: %v", registry.Name, err)
		}
		<-registry.Done()
	}, target, want)
}

// outage breaks the registry (breakIt) and checks that meshturbo-xds then reports the
// source stale (admin API and metrics), serves exactly the ServiceEntries it served before,
// and that Envoy keeps reaching target.
func outage(t *testing.T, mt *xdsDaemon, sc *sidecar, src model.Source, what string, breakIt func(), target, want string) {
	t.Helper()
	before := serviceEntries(t, mt.AdminAddr)
	breakIt()
	broken := time.Now()
	st := awaitSource(t, mt.AdminAddr, src, 10*time.Second, "reported stale after "+what,
		func(s bridge.SourceStatus) bool { return s.Stale })
	awaitMetric(t, mt.AdminAddr, fmt.Sprintf("meshturbo_bridge_stale{source=%q} 1", src), 5*time.Second)
	t.Logf("%s: reported stale after %s (last error %q)", what, time.Since(broken).Round(time.Millisecond), st.LastError)
	if st.Services == 0 {
		t.Errorf("%s: /v1/registries reports 0 services; the last snapshot should still count", what)
	}
	callsSucceed(t, sc, target, want)
	if after := serviceEntries(t, mt.AdminAddr); !maps.Equal(before, after) {
		t.Fatalf("ServiceEntries changed (%s):\nbefore %v\nafter  %v", what, before, after)
	}
}

// mustCall waits until a call to target through the sidecar answers 200 with want in the body.
func mustCall(t *testing.T, sc *sidecar, target, want string, within time.Duration) {
	t.Helper()
	if _, err := sc.awaitCall(target, within, "call answering "+want, func(code int, body string) bool {
		return code == 200 && strings.Contains(body, want)
	}); err != nil {
		t.Fatal(err)
	}
}

// callsSucceed makes ten calls in a row; every one must answer 200 with want.
func callsSucceed(t *testing.T, sc *sidecar, target, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 10 {
		code, body, err := sc.call(ctx, target)
		if err != nil || code != 200 || !strings.Contains(body, want) {
			t.Fatalf("call %d to %s through Envoy: HTTP %d %q, error %v; want 200 %q", i+1, target, code, body, err, want)
		}
	}
}

// registryStatus reads /v1/registries for one source.
func registryStatus(admin string, src model.Source) (bridge.SourceStatus, error) {
	resp, err := http.Get("http://" + admin + "/v1/registries")
	if err != nil {
		return bridge.SourceStatus{}, err
	}
	defer resp.Body.Close()
	var all []bridge.SourceStatus
	if err := json.NewDecoder(resp.Body).Decode(&all); err != nil {
		return bridge.SourceStatus{}, fmt.Errorf("decode /v1/registries: %w", err)
	}
	for _, s := range all {
		if s.Source == src {
			return s, nil
		}
	}
	return bridge.SourceStatus{}, fmt.Errorf("/v1/registries has no source %s", src)
}

// awaitSource polls /v1/registries until ok accepts src's status.
func awaitSource(t *testing.T, admin string, src model.Source, within time.Duration, what string, ok func(bridge.SourceStatus) bool) bridge.SourceStatus {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st, err := registryStatus(admin, src)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			b, _ := json.Marshal(st)
			t.Fatalf("%s: not %s within %s; last status %s (error %v)", src, what, within, b, err)
		}
		time.Sleep(50 * time.Millisecond) // polling the daemon's state until the deadline
	}
}

// awaitFresh waits until src is no longer stale, in /v1/registries and in /metrics.
func awaitFresh(t *testing.T, mt *xdsDaemon, src model.Source) {
	t.Helper()
	awaitSource(t, mt.AdminAddr, src, recoveryWithin, "fresh again", func(s bridge.SourceStatus) bool { return !s.Stale && s.LastError == "" })
	awaitMetric(t, mt.AdminAddr, fmt.Sprintf("meshturbo_bridge_stale{source=%q} 0", src), recoveryWithin)
}

// assertSkipped checks that /v1/registries lists a skipped entry of src whose ID or host
// contains id, with reason, and that /metrics counts it under code.
func assertSkipped(t *testing.T, mt *xdsDaemon, src model.Source, id, reason string, code model.SkipCode) {
	t.Helper()
	st := awaitSource(t, mt.AdminAddr, src, 5*time.Second, "listing the skipped "+id, func(s bridge.SourceStatus) bool {
		for _, sk := range s.Skipped {
			if (strings.Contains(sk.ID, id) || strings.Contains(sk.Hostname, id)) && strings.Contains(sk.Reason, reason) && sk.Code == code {
				return true
			}
		}
		return false
	})
	awaitMetric(t, mt.AdminAddr, fmt.Sprintf("meshturbo_bridge_skipped_entries{reason=%q,source=%q} 1", code, src), 5*time.Second)
	t.Logf("%s: skipped as expected: %v", src, st.Skipped)
}

// awaitMetric polls /metrics until it has line.
func awaitMetric(t *testing.T, admin, line string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, l := range strings.Split(string(b), "\n") {
				if l == line {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics of meshturbo-xds has no line %q within %s", line, within)
		}
		time.Sleep(50 * time.Millisecond) // polling the daemon's state until the deadline
	}
}

// serviceEntries is what meshturbo-xds serves istiod: ServiceEntry name → version.
func serviceEntries(t *testing.T, admin string) map[string]string {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/v1/xds/serviceentries")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		Resources map[string]string `json:"resources"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatalf("decode /v1/xds/serviceentries: %v", err)
	}
	if len(v.Resources) == 0 {
		t.Fatal("meshturbo-xds serves no ServiceEntry")
	}
	return v.Resources
}

// zkSessions returns the ids ("0x…") of the sessions the server holds now, from "cons".
func zkSessions(t *testing.T, addr string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cons, err := testenv.FourLetterWord(ctx, addr, "cons")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, f := range strings.FieldsFunc(cons, func(r rune) bool { return r == ',' || r == '(' || r == ')' }) {
		if v, ok := strings.CutPrefix(f, "sid="); ok {
			ids = append(ids, v)
		}
	}
	if len(ids) == 0 {
		t.Fatalf("zookeeper %s lists no session:\n%s", addr, cons)
	}
	return ids
}

// awaitSessionsGone waits until the server has expired every one of sessions ("dump" lists
// the sessions it tracks).
func awaitSessionsGone(t *testing.T, addr string, sessions []string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		dump, err := testenv.FourLetterWord(ctx, addr, "dump")
		cancel()
		if err == nil && strings.Contains(dump, "SessionTracker dump") {
			left := 0
			for _, s := range sessions {
				if strings.Contains(dump, s) {
					left++
				}
			}
			if left == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("zookeeper still tracks sessions %v after 20s (err %v):\n%s", sessions, err, dump)
		}
		time.Sleep(100 * time.Millisecond) // polling the server's state until the deadline
	}
}
