package consul

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestNextIndex(t *testing.T) {
	for _, tc := range []struct{ prev, got, want uint64 }{
		{0, 5, 5}, // first answer
		{5, 9, 9}, // moved forward
		{9, 9, 9}, // timed out with no change
		{9, 3, 0}, // went backwards (snapshot restore, new leader): start over
		{9, 0, 0}, // went to zero: backwards too
		{0, 0, 1}, // zero from the start: block from 1 so the loop does not spin
	} {
		if got := NextIndex(tc.prev, tc.got); got != tc.want {
			t.Errorf("NextIndex(%d, %d) = %d, want %d", tc.prev, tc.got, got, tc.want)
		}
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

func runWatcher(t *testing.T, addr string, log *slog.Logger) *testenv.Snapshots {
	_, s := startWatcher(t, addr, log)
	return s
}

func startWatcher(t *testing.T, addr string, log *slog.Logger) (*Watcher, *testenv.Snapshots) {
	t.Helper()
	w, err := New(Config{Address: addr, Logger: log, WaitTime: 2 * time.Second, Debounce: 10 * time.Millisecond})
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

func agentClient(t *testing.T, addr string) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = addr
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestWatchesPassingInstances(t *testing.T) {
	consul := testenv.StartConsul(t)
	c := agentClient(t, consul.HTTPAddr)
	reg := func(id, addr string, port int, status string, meta map[string]string, tags ...string) {
		t.Helper()
		r := &api.AgentServiceRegistration{ID: id, Name: "orders", Address: addr, Port: port, Meta: meta, Tags: tags}
		if status != "" {
			r.Check = &api.AgentServiceCheck{TTL: "10m", Status: status}
		}
		if err := c.Agent().ServiceRegister(r); err != nil {
			t.Fatal(err)
		}
	}
	reg("orders-1", "10.0.0.1", 8080, "", map[string]string{"protocol": "http", "mesh": "true"}, "version=v1", "plain-tag")
	reg("orders-2", "10.0.0.2", 8080, api.HealthPassing, map[string]string{"protocol": "http"})
	reg("orders-3", "10.0.0.3", 9090, api.HealthCritical, nil) // failing: never served

	snaps := runWatcher(t, consul.HTTPAddr, testenv.Logger(t))
	svcs := snaps.Await(t, 10*time.Second, "orders with two passing instances", func(s []model.Service) bool {
		o := find(s, "orders.service.consul")
		return o != nil && len(o.Endpoints) == 2
	})
	o := find(svcs, "orders.service.consul")
	if want := []model.Port{{Name: "http", Number: 8080, Protocol: model.ProtocolHTTP}}; o.Ports[0] != want[0] {
		t.Errorf("ports = %+v, want %+v", o.Ports, want)
	}
	byID := map[string]model.Endpoint{}
	for _, e := range o.Endpoints {
		byID[e.ID] = e
	}
	if _, ok := byID["orders-3"]; ok {
		t.Error("critical instance orders-3 served")
	}
	e1 := byID["orders-1"]
	if !e1.Meshed || e1.Labels["version"] != "v1" || e1.Address != "10.0.0.1" || e1.Ports["http"] != 8080 {
		t.Errorf("orders-1 = %+v", e1)
	}
	if byID["orders-2"].Meshed {
		t.Error("orders-2 has no mesh meta but is marked meshed")
	}

	// The critical instance turns passing: it appears, on its own port.
	if err := c.Agent().UpdateTTL("service:orders-3", "", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	snaps.Await(t, 10*time.Second, "orders-3 after its check passes", func(s []model.Service) bool {
		o := find(s, "orders.service.consul")
		return o != nil && len(o.Endpoints) == 3
	})

	// Deregistering every instance removes the service.
	for _, id := range []string{"orders-1", "orders-2", "orders-3"} {
		if err := c.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
	}
	snaps.Await(t, 10*time.Second, "orders removed", func(s []model.Service) bool { return find(s, "orders.service.consul") == nil })
}

// syncBuffer is a concurrency-safe log sink the test can read.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func awaitLog(t *testing.T, logs *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q; log:\n%s", want, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDeadConsulKeepsLastSnapshotAndSaysWhere(t *testing.T) {
	consul := testenv.StartConsul(t)
	c := agentClient(t, consul.HTTPAddr)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "db-1", Name: "db", Address: "10.0.0.9", Port: 5432}); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	w, snaps := startWatcher(t, consul.HTTPAddr, slog.New(slog.NewTextHandler(logs, nil)))
	snaps.Await(t, 10*time.Second, "db", func(s []model.Service) bool { return find(s, "db.service.consul") != nil })
	before := snaps.Count()
	if h := w.Health(); !h.Connected || h.LastContact.IsZero() {
		t.Fatalf("health while Consul answers = %+v", h)
	}

	if err := consul.Stop(); err != nil {
		t.Fatal(err)
	}
	awaitLog(t, logs, fmt.Sprintf("address=%s", consul.HTTPAddr))
	awaitLog(t, logs, "keeping the last snapshot")
	if h := w.Health(); h.Connected || h.LastError == "" {
		t.Errorf("health while Consul is down = %+v, want disconnected with the error", h)
	}
	if n := snaps.Count(); n != before {
		t.Fatalf("published %d snapshots while Consul was down; the last good one must stay", n-before)
	}
}

func TestUnreachableConsulNeverPublishes(t *testing.T) {
	addr := testenv.Addr(testenv.FreePort(t)) // nothing listens here
	logs := &syncBuffer{}
	snaps := runWatcher(t, addr, slog.New(slog.NewTextHandler(logs, nil)))
	awaitLog(t, logs, "consul catalog query failed")
	if !strings.Contains(logs.String(), addr) {
		t.Errorf("warning does not name the address %s:\n%s", addr, logs.String())
	}
	if snaps.Count() != 0 {
		t.Fatal("published a snapshot without ever reaching Consul")
	}
}

func TestConfigValidation(t *testing.T) {
	if _, err := New(Config{}); err == nil || !strings.Contains(err.Error(), "Address") {
		t.Fatalf("err = %v, want one naming Address", err)
	}
}

// TestConsulRestartResetsIndex restarts the (in-memory, dev mode) agent: its raft index starts
// again from a small number, below the one the watcher holds. The watcher must notice the
// index going backwards, publish nothing while Consul is down, and converge on the new state.
func TestConsulRestartResetsIndex(t *testing.T) {
	consul := testenv.StartConsul(t)
	c := agentClient(t, consul.HTTPAddr)
	register := func(names ...string) {
		t.Helper()
		for i, n := range names {
			if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
				ID: n + "-1", Name: n, Address: fmt.Sprintf("10.0.1.%d", i+1), Port: 80}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Push the index well up first, so the restarted agent's index is lower.
	for i := range 30 {
		register(fmt.Sprintf("warmup%d", i))
	}
	for i := range 30 {
		if err := c.Agent().ServiceDeregister(fmt.Sprintf("warmup%d-1", i)); err != nil {
			t.Fatal(err)
		}
	}
	register("a", "b", "c")
	w, snaps := startWatcher(t, consul.HTTPAddr, testenv.Logger(t))
	snaps.Await(t, 10*time.Second, "a, b and c", func(s []model.Service) bool { return len(s) == 3 })
	before := snaps.Count()
	_, meta, err := c.Catalog().Services(nil)
	if err != nil {
		t.Fatal(err)
	}
	indexBefore := meta.LastIndex

	if err := consul.Stop(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for w.Health().Connected {
		if time.Now().After(deadline) {
			t.Fatal("the watcher never noticed Consul was down")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if snaps.Count() != before {
		t.Fatal("published while Consul was down")
	}

	consul.Restart(t)
	c = agentClient(t, consul.HTTPAddr)
	_, meta, err = c.Catalog().Services(nil)
	if err != nil {
		t.Fatal(err)
	}
	if meta.LastIndex >= indexBefore {
		t.Fatalf("index after restart %d is not below %d: the test does not exercise a reset", meta.LastIndex, indexBefore)
	}
	// The agent keeps its local registrations across the restart; change them meanwhile.
	for _, id := range []string{"b-1", "c-1"} {
		if err := c.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
	}
	register("a", "d")
	start := time.Now()
	snaps.Await(t, 10*time.Second, "a and d after the restart", func(s []model.Service) bool {
		return len(s) == 2 && find(s, "a.service.consul") != nil && find(s, "d.service.consul") != nil
	})
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("converged %s after recovery, want within 5s", took)
	}
}

// TestLongFirstSyncPublishesWhenDone: a first sync that takes longer than 20 Debounce (here
// 1,000 services, each with its first health query) is published as soon as every service
// has answered, not at InitialSync.
func TestLongFirstSyncPublishesWhenDone(t *testing.T) {
	consul := testenv.StartConsul(t)
	c := agentClient(t, consul.HTTPAddr)
	if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: "many", Address: "10.9.0.1"}, nil); err != nil {
		t.Fatal(err)
	}
	const n = 1000
	var ops api.TxnOps
	for i := range n {
		ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: "many",
			Service: api.AgentService{ID: fmt.Sprintf("s%d-1", i), Service: fmt.Sprintf("s%d", i), Address: fmt.Sprintf("10.9.%d.%d", i/250, i%250+1), Port: 80}}})
		if len(ops) == 64 || i == n-1 {
			if ok, resp, _, err := c.Txn().Txn(ops, nil); err != nil || !ok {
				t.Fatalf("consul txn: %v %v", err, resp)
			}
			ops = nil
		}
	}
	start := time.Now()
	snaps := runWatcher(t, consul.HTTPAddr, testenv.Logger(t)) // InitialSync: the default 30s
	snaps.Await(t, 15*time.Second, "all 1,000 services", func(s []model.Service) bool { return len(s) >= n })
	t.Logf("first snapshot with %d services after %s", n, time.Since(start).Round(time.Millisecond))
}
