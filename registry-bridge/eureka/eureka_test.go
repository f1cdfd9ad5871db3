package eureka

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// eurekaAPI registers and changes instances through Eureka's REST API, as Eureka clients do.
type eurekaAPI struct {
	t    *testing.T
	base string
	http *http.Client
}

func newEurekaAPI(t *testing.T, base string) *eurekaAPI {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	t.Cleanup(tr.CloseIdleConnections)
	return &eurekaAPI{t: t, base: base, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// reg describes an instance to register.
type reg struct {
	app, id, ip string
	port        int
	portOff     bool // register the non-secure port as disabled
	securePort  int  // enabled when not 0
	status      string
	meta        map[string]string
}

func (a *eurekaAPI) do(method, path string, body []byte, want int) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.base+path, bytes.NewReader(body))
	if err != nil {
		a.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.http.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		a.t.Fatalf("%s %s: %s %s, want %d", method, path, resp.Status, msg, want)
	}
}

// register is POST /apps/{APP}, with a lease long enough that no test sees it expire.
func (a *eurekaAPI) register(r reg) {
	a.t.Helper()
	status := r.status
	if status == "" {
		status = statusUp
	}
	securePort := map[string]any{"$": 443, "@enabled": "false"}
	if r.securePort != 0 {
		securePort = map[string]any{"$": r.securePort, "@enabled": "true"}
	}
	in := map[string]any{
		"instanceId": r.id,
		"hostName":   r.id + ".hosts.test",
		"app":        r.app,
		"ipAddr":     r.ip,
		"status":     status,
		"port":       map[string]any{"$": r.port, "@enabled": fmt.Sprint(!r.portOff)},
		"securePort": securePort,
		"vipAddress": r.app,
		"dataCenterInfo": map[string]any{
			"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
			"name":   "MyOwn",
		},
		"leaseInfo": map[string]any{"renewalIntervalInSecs": 30, "durationInSecs": 600},
	}
	if r.meta != nil {
		in["metadata"] = r.meta
	}
	body, err := json.Marshal(map[string]any{"instance": in})
	if err != nil {
		a.t.Fatal(err)
	}
	a.do(http.MethodPost, "/apps/"+r.app, body, http.StatusNoContent)
}

// setStatus is PUT /apps/{APP}/{id}/status?value=…, the status override.
func (a *eurekaAPI) setStatus(app, id, status string) {
	a.t.Helper()
	a.do(http.MethodPut, "/apps/"+app+"/"+id+"/status?value="+status, nil, http.StatusOK)
}

// heartbeat is PUT /apps/{APP}/{id}.
func (a *eurekaAPI) heartbeat(app, id string) {
	a.t.Helper()
	a.do(http.MethodPut, "/apps/"+app+"/"+id, nil, http.StatusOK)
}

// deregister is DELETE /apps/{APP}/{id}.
func (a *eurekaAPI) deregister(app, id string) {
	a.t.Helper()
	a.do(http.MethodDelete, "/apps/"+app+"/"+id, nil, http.StatusOK)
}

// awaitStats polls the watcher's stats until ok holds, for up to within.
func awaitStats(t *testing.T, w *Watcher, within time.Duration, what string, ok func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		st := w.Stats()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; stats: %+v", what, within, st)
		}
		<-tick.C
	}
}

func find(svcs []model.Service, host string) *model.Service {
	for i := range svcs {
		if svcs[i].Hostname == host {
			return &svcs[i]
		}
	}
	return nil
}

func endpointIDs(svcs []model.Service, host string) []string {
	s := find(svcs, host)
	if s == nil {
		return nil
	}
	var ids []string
	for _, e := range s.Endpoints {
		ids = append(ids, e.ID)
	}
	return ids
}

// hasEndpoints reports whether host is published with exactly the endpoints ids, in any order.
func hasEndpoints(host string, ids ...string) func([]model.Service) bool {
	return func(svcs []model.Service) bool {
		got := endpointIDs(svcs, host)
		if find(svcs, host) == nil || len(got) != len(ids) {
			return false
		}
		want := map[string]bool{}
		for _, id := range ids {
			want[id] = true
		}
		for _, id := range got {
			if !want[id] {
				return false
			}
		}
		return true
	}
}

// runWatcher runs a watcher until the test ends.
func runWatcher(t *testing.T, cfg Config) (*Watcher, *testenv.Snapshots) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testenv.Logger(t)
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 200 * time.Millisecond
	}
	if cfg.Debounce == 0 {
		cfg.Debounce = 10 * time.Millisecond
	}
	w, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	snaps := testenv.NewSnapshots()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, snaps.Publish) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return w, snaps
}

func TestWatchesUpInstances(t *testing.T) {
	eureka := testenv.StartEureka(t)
	api := newEurekaAPI(t, eureka.URL)
	api.register(reg{app: "ORDERS", id: "o1", ip: "10.0.0.1", port: 8080, meta: map[string]string{"protocol": "http", "mesh": "true", "version": "v1"}})
	api.register(reg{app: "ORDERS", id: "o2", ip: "10.0.0.2", port: 8080, meta: map[string]string{"protocol": "http"}})
	api.register(reg{app: "ORDERS", id: "o3", ip: "10.0.0.3", port: 9090})
	api.register(reg{app: "ORDERS", id: "o4", ip: "10.0.0.4", port: 8080, status: statusStarting})
	api.register(reg{app: "PAYMENTS", id: "p1", ip: "10.0.1.1", port: 8080, portOff: true, securePort: 8443})
	// Eureka takes all of these as they are; the watcher must not.
	api.register(reg{app: "BROKEN", id: "b-ip", ip: "not-an-ip", port: 8080})
	api.register(reg{app: "BROKEN", id: "b-port0", ip: "10.0.2.1", port: 0})
	api.register(reg{app: "BROKEN", id: "b-port70000", ip: "10.0.2.2", port: 70000})

	w, snaps := runWatcher(t, Config{URLs: []string{eureka.URL}})
	svcs := snaps.Await(t, 10*time.Second, "orders with its three UP instances", hasEndpoints("orders.eureka", "o1", "o2", "o3"))

	orders := find(svcs, "orders.eureka")
	if want := (model.Port{Name: "http", Number: 8080, Protocol: model.ProtocolHTTP}); len(orders.Ports) != 1 || orders.Ports[0] != want {
		t.Errorf("orders ports = %+v, want %+v", orders.Ports, want)
	}
	byID := map[string]model.Endpoint{}
	for _, e := range orders.Endpoints {
		byID[e.ID] = e
	}
	if e := byID["o1"]; e.Address != "10.0.0.1" || e.Ports["http"] != 8080 || !e.Meshed ||
		!maps.Equal(e.Labels, map[string]string{"protocol": "http", "mesh": "true", "version": "v1"}) {
		t.Errorf("o1 = %+v", e)
	}
	if e := byID["o2"]; e.Meshed || e.Labels["protocol"] != "http" {
		t.Errorf("o2 = %+v", e)
	}
	if e := byID["o3"]; e.Ports["http"] != 9090 || e.Labels != nil {
		t.Errorf("o3 = %+v", e)
	}
	pay := find(svcs, "payments.eureka")
	if pay == nil || len(pay.Endpoints) != 1 || pay.Ports[0] != (model.Port{Name: "https", Number: 8443, Protocol: model.ProtocolHTTPS}) ||
		pay.Endpoints[0].Ports["https"] != 8443 {
		t.Errorf("payments = %+v, want the secure port 8443 as HTTPS", pay)
	}
	if b := find(svcs, "broken.eureka"); b != nil {
		t.Errorf("broken.eureka published: %+v", b)
	}
	if got, want := w.Stats().Skipped, map[string]int{reasonBadIP: 1, reasonBadPort: 2}; !maps.Equal(got, want) {
		t.Errorf("skipped = %v, want %v", got, want)
	}

	api.setStatus("ORDERS", "o2", statusOutOfService)
	snaps.Await(t, 5*time.Second, "o2 gone once OUT_OF_SERVICE", hasEndpoints("orders.eureka", "o1", "o3"))
	api.setStatus("ORDERS", "o3", statusDown)
	snaps.Await(t, 5*time.Second, "o3 gone once DOWN", hasEndpoints("orders.eureka", "o1"))
	api.heartbeat("ORDERS", "o1")
	api.deregister("ORDERS", "o1")
	svcs = snaps.Await(t, 5*time.Second, "o1 gone once deregistered", hasEndpoints("orders.eureka"))
	if p := find(svcs, "orders.eureka").Ports; len(p) != 1 || p[0].Number != 8080 {
		t.Errorf("orders without UP instances: ports = %+v, want the service kept on 8080", p)
	}
	api.register(reg{app: "ORDERS", id: "o5", ip: "10.0.0.5", port: 8080})
	snaps.Await(t, 5*time.Second, "o5 after registering", hasEndpoints("orders.eureka", "o5"))
	api.deregister("PAYMENTS", "p1")
	snaps.Await(t, 5*time.Second, "payments gone with its only instance", func(s []model.Service) bool { return find(s, "payments.eureka") == nil })

	// Every change above came by delta: one full fetch at the start, none since.
	before := w.Stats()
	st := awaitStats(t, w, 5*time.Second, "three more delta fetches", func(s Stats) bool { return s.DeltaFetches >= before.DeltaFetches+3 })
	if st.FullFetches != 1 || st.HashMismatches != 0 || len(st.Failures) != 0 || st.Stale {
		t.Errorf("stats = %+v, want 1 full fetch, deltas since, no mismatch or failure", st)
	}
}

// TestEurekaRestart stops the real server: the watcher keeps its snapshot while Eureka is
// down and follows it again once it is back.
func TestEurekaRestart(t *testing.T) {
	eureka := testenv.StartEureka(t)
	api := newEurekaAPI(t, eureka.URL)
	api.register(reg{app: "ORDERS", id: "o1", ip: "10.0.0.1", port: 8080})
	w, snaps := runWatcher(t, Config{URLs: []string{eureka.URL}, RequestTimeout: time.Second})
	snaps.Await(t, 10*time.Second, "orders", hasEndpoints("orders.eureka", "o1"))

	if err := eureka.Stop(); err != nil {
		t.Fatal(err)
	}
	n := snaps.Count()
	awaitStats(t, w, 10*time.Second, "fetches failing while Eureka is down", func(s Stats) bool {
		return s.Failures[FailureUnreachable] >= 3 && s.Stale
	})
	if got := snaps.Count(); got != n {
		t.Fatalf("published %d snapshots while Eureka was down: %+v", got-n, snaps.Last())
	}

	eureka.Restart(t)
	// A restarted Eureka is empty until its clients register again, as they do on their next
	// heartbeat (which answers 404).
	api.register(reg{app: "ORDERS", id: "o2", ip: "10.0.0.2", port: 8080})
	snaps.Await(t, 5*time.Second, "orders from the restarted Eureka", hasEndpoints("orders.eureka", "o2"))
	if st := w.Stats(); st.Stale {
		t.Errorf("still stale after recovery: %+v", st)
	}
}

func TestNewValidates(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{URLs: []string{"127.0.0.1:8761/eureka"}},
		{URLs: []string{"ftp://eureka/eureka"}},
		{URLs: []string{"http://eureka:8761/eureka"}, Domain: "Not A Domain"},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
	w, err := New(Config{URLs: []string{"http://user:secret@eureka:8761/eureka"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if st := w.Stats(); st.URL != "http://user:xxxxx@eureka:8761/eureka" {
		t.Errorf("stats URL = %q, want the password redacted", st.URL)
	}
	if w.cfg.Domain != "eureka" || w.cfg.PollInterval != time.Second || w.cfg.MaxResponseBytes != 256<<20 {
		t.Errorf("defaults = %+v", w.cfg)
	}
}
