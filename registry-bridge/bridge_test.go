package bridge

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshturbo/meshturbo/model"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeWatcher publishes whatever the test sends it: a stand-in for a registry when the test is
// about the bridge's own logic (validation, merge, retention), not about a registry.
type fakeWatcher struct {
	src  model.Source
	snap chan []model.Service
}

func newFake(src model.Source) *fakeWatcher {
	return &fakeWatcher{src: src, snap: make(chan []model.Service)}
}

func (f *fakeWatcher) Source() model.Source { return f.src }

func (f *fakeWatcher) Run(ctx context.Context, publish func([]model.Service)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-f.snap:
			publish(s)
		}
	}
}

type catalogs struct {
	mu  sync.Mutex
	got []*model.Catalog
	ch  chan struct{}
}

func (c *catalogs) on(cat *model.Catalog) {
	c.mu.Lock()
	c.got = append(c.got, cat)
	c.mu.Unlock()
	select {
	case c.ch <- struct{}{}:
	default:
	}
}

// next waits for a catalog satisfying ok.
func (c *catalogs) next(t *testing.T, ok func(*model.Catalog) bool) *model.Catalog {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		c.mu.Lock()
		if n := len(c.got); n > 0 && ok(c.got[n-1]) {
			cat := c.got[n-1]
			c.mu.Unlock()
			return cat
		}
		c.mu.Unlock()
		select {
		case <-c.ch:
		case <-deadline:
			t.Fatal("no matching catalog within 5s")
		}
	}
}

func svc(src model.Source, host string, addrs ...string) model.Service {
	s := model.Service{Hostname: host, Source: src, Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}}}
	for _, a := range addrs {
		s.Endpoints = append(s.Endpoints, model.Endpoint{ID: a, Address: a, Ports: map[string]uint32{"http": 8080}})
	}
	return s
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func startBridge(t *testing.T, clk *clock, ws ...Watcher) (*Bridge, *catalogs) {
	t.Helper()
	cats := &catalogs{ch: make(chan struct{}, 1)}
	cfg := Config{Watchers: ws, OnCatalog: cats.on, Debounce: time.Millisecond, Retention: time.Minute}
	if clk != nil {
		cfg.Now = clk.Now
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, cats
}

func TestMalformedEntriesAreSkippedAndReported(t *testing.T) {
	w := newFake(model.SourceConsul)
	b, cats := startBridge(t, nil, w)
	w.snap <- []model.Service{
		svc(model.SourceConsul, "good.service.consul", "10.0.0.1", "not-an-ip"),
		{Hostname: "noport.service.consul", Source: model.SourceConsul},
	}
	cat := cats.next(t, func(c *model.Catalog) bool { return len(c.Services) > 0 })
	if len(cat.Services) != 1 || len(cat.Services[0].Endpoints) != 1 {
		t.Fatalf("catalog = %+v, want good with one endpoint", cat.Services)
	}
	st := b.Status()[0]
	if !st.Synced || st.Services != 1 || st.Endpoints != 1 || len(st.Skipped) != 2 {
		t.Fatalf("status = %+v, want 1 service, 1 endpoint, 2 skipped", st)
	}
}

func TestVanishedServiceIsRetainedEmptyThenRemoved(t *testing.T) {
	clk := &clock{now: time.Unix(1_000_000, 0)}
	w := newFake(model.SourceConsul)
	_, cats := startBridge(t, clk, w)
	a := svc(model.SourceConsul, "a.service.consul", "10.0.0.1")
	gone := svc(model.SourceConsul, "b.service.consul", "10.0.0.2")
	w.snap <- []model.Service{a, gone}
	cats.next(t, func(c *model.Catalog) bool { return len(c.Services) == 2 })

	w.snap <- []model.Service{a}
	cat := cats.next(t, func(c *model.Catalog) bool {
		b := c.Lookup("b.service.consul")
		return b != nil && len(b.Endpoints) == 0
	})
	if len(cat.Lookup("a.service.consul").Endpoints) != 1 {
		t.Fatal("a lost its endpoint")
	}

	clk.Add(2 * time.Minute)
	w.snap <- []model.Service{a, svc(model.SourceConsul, "c.service.consul", "10.0.0.3")}
	cats.next(t, func(c *model.Catalog) bool {
		return c.Lookup("b.service.consul") == nil && c.Lookup("c.service.consul") != nil
	})

	// A service that comes back within the retention gets its endpoints again.
	w.snap <- []model.Service{a}
	cats.next(t, func(c *model.Catalog) bool {
		return c.Lookup("c.service.consul") != nil && len(c.Lookup("c.service.consul").Endpoints) == 0
	})
	w.snap <- []model.Service{a, svc(model.SourceConsul, "c.service.consul", "10.0.0.4")}
	cats.next(t, func(c *model.Catalog) bool {
		s := c.Lookup("c.service.consul")
		return s != nil && len(s.Endpoints) == 1 && s.Endpoints[0].Address == "10.0.0.4"
	})
}

func TestPrioritySourceWinsConflicts(t *testing.T) {
	first, second := newFake(model.SourceConsul), newFake(model.SourceEureka)
	_, cats := startBridge(t, nil, first, second)
	second.snap <- []model.Service{svc(model.SourceEureka, "x.example", "10.0.0.2")}
	first.snap <- []model.Service{svc(model.SourceConsul, "x.example", "10.0.0.1")}
	cat := cats.next(t, func(c *model.Catalog) bool {
		s := c.Lookup("x.example")
		return s != nil && s.Source == model.SourceConsul
	})
	if len(cat.Skipped) != 1 || cat.Skipped[0].Source != model.SourceEureka {
		t.Fatalf("skipped = %+v, want eureka's x.example", cat.Skipped)
	}
}

func TestConfigErrors(t *testing.T) {
	if _, err := New(Config{OnCatalog: func(*model.Catalog) {}}); err == nil {
		t.Error("no watchers accepted")
	}
	w := newFake(model.SourceConsul)
	if _, err := New(Config{Watchers: []Watcher{w, w}, OnCatalog: func(*model.Catalog) {}}); err == nil {
		t.Error("a source configured twice accepted")
	}
}

type healthyFake struct {
	*fakeWatcher
	mu sync.Mutex
	h  Health
}

func (f *healthyFake) Health() Health { f.mu.Lock(); defer f.mu.Unlock(); return f.h }

func TestStaleSourceIsReportedAndKeepsItsServices(t *testing.T) {
	w := &healthyFake{fakeWatcher: newFake(model.SourceConsul), h: Health{Connected: true}}
	b, cats := startBridge(t, nil, w)
	w.snap <- []model.Service{svc(model.SourceConsul, "a.service.consul", "10.0.0.1")}
	cats.next(t, func(c *model.Catalog) bool { return len(c.Services) == 1 })
	if st := b.Status()[0]; st.Stale {
		t.Fatalf("connected source reported stale: %+v", st)
	}
	w.mu.Lock()
	w.h = Health{Connected: false, LastError: "connection refused"}
	w.mu.Unlock()
	st := b.Status()[0]
	if !st.Stale || st.LastError != "connection refused" || st.Services != 1 {
		t.Fatalf("status = %+v, want stale with the error and its 1 service kept", st)
	}
	if c := b.Catalog(); c == nil || c.Lookup("a.service.consul") == nil {
		t.Fatal("stale source's service left the catalog")
	}
}

func TestSourceOptionsFilterAndPlace(t *testing.T) {
	inner := newFake(model.SourceConsul)
	w, err := WithOptions(inner, SourceOptions{Include: []string{"*.service.consul"}, Exclude: []string{"secret*"}, IstioNamespace: "legacy"})
	if err != nil {
		t.Fatal(err)
	}
	_, cats := startBridge(t, nil, w)
	inner.snap <- []model.Service{
		svc(model.SourceConsul, "orders.service.consul", "10.0.0.1"),
		svc(model.SourceConsul, "secret.service.consul", "10.0.0.2"),
		svc(model.SourceConsul, "other.example", "10.0.0.3"),
	}
	cat := cats.next(t, func(c *model.Catalog) bool { return len(c.Services) > 0 })
	if len(cat.Services) != 1 || cat.Services[0].Hostname != "orders.service.consul" || cat.Services[0].Namespace != "legacy" {
		t.Fatalf("catalog = %+v, want only orders, in namespace legacy", cat.Services)
	}
	res, err := Translate(cat, TranslateOptions{})
	if err != nil || res[0].Namespace != "legacy" {
		t.Fatalf("translated into %q (%v), want legacy", res[0].Namespace, err)
	}
	if _, err := WithOptions(inner, SourceOptions{Include: []string{"[bad"}}); err == nil {
		t.Error("a malformed pattern was accepted")
	}
}

func TestSkippedEntryIsLoggedOnce(t *testing.T) {
	var buf syncBuf
	w := newFake(model.SourceConsul)
	cats := &catalogs{ch: make(chan struct{}, 1)}
	b, err := New(Config{Watchers: []Watcher{w}, OnCatalog: cats.on, Debounce: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	bad := svc(model.SourceConsul, "a.service.consul", "10.0.0.1", "not-an-ip")
	w.snap <- []model.Service{bad}
	w.snap <- []model.Service{bad, svc(model.SourceConsul, "b.service.consul", "10.0.0.2")}
	cats.next(t, func(c *model.Catalog) bool { return len(c.Services) == 2 })
	if n := strings.Count(buf.String(), "registry entry skipped"); n != 1 {
		t.Fatalf("the same bad entry was logged %d times, want once:\n%s", n, buf.String())
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// skippingWatcher is a fakeWatcher that also left entries out before publishing.
type skippingWatcher struct {
	*fakeWatcher
	skipped []model.Skipped
}

func (s *skippingWatcher) Skipped() []model.Skipped { return s.skipped }

// TestWatcherSkipsInStatus: entries a watcher skipped itself show in Status next to the
// bridge's own, through source options too, but for services the options leave out.
func TestWatcherSkipsInStatus(t *testing.T) {
	inner := &skippingWatcher{fakeWatcher: newFake(model.SourceZooKeeper), skipped: []model.Skipped{
		{Source: model.SourceZooKeeper, ID: "/dubbo/Broken/providers/x", Code: model.SkipMalformed, Reason: "bad-url: no scheme"},
		{Source: model.SourceZooKeeper, Hostname: "secret.dubbo", ID: "10.0.0.9:20880", Code: model.SkipConflict, Reason: "duplicate"},
	}}
	w, err := WithOptions(inner, SourceOptions{Exclude: []string{"secret*"}})
	if err != nil {
		t.Fatal(err)
	}
	b, cats := startBridge(t, nil, w)
	inner.snap <- []model.Service{svc(model.SourceZooKeeper, "a.dubbo", "10.0.0.1", "not-an-ip")}
	cats.next(t, func(c *model.Catalog) bool { return len(c.Services) == 1 })
	st := b.Status()[0]
	if len(st.Skipped) != 2 || st.Skipped[0].Code != model.SkipBadAddress || st.Skipped[1].ID != "/dubbo/Broken/providers/x" {
		t.Fatalf("skipped = %+v, want the bridge's bad address, then the watcher's malformed URL (not the excluded service's)", st.Skipped)
	}
	// Status must not grow what the bridge keeps.
	if again := b.Status()[0]; len(again.Skipped) != 2 {
		t.Fatalf("second Status has %d skipped entries, want 2", len(again.Skipped))
	}
}

// TestPacedByBuildCost: a catalog that takes 30ms to serve is followed by at least Pace×30ms
// of rest, however fast changes arrive, and the last change is still served.
func TestPacedByBuildCost(t *testing.T) {
	w := newFake(model.SourceConsul)
	var mu sync.Mutex
	var built []int // endpoints of a.service.consul in each catalog
	b, err := New(Config{Watchers: []Watcher{w}, Debounce: time.Millisecond, OnCatalog: func(c *model.Catalog) {
		time.Sleep(30 * time.Millisecond) // a big catalog's cost
		mu.Lock()
		defer mu.Unlock()
		if s := c.Lookup("a.service.consul"); s != nil {
			built = append(built, len(s.Endpoints))
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	start := time.Now()
	n := 0
	for time.Since(start) < 600*time.Millisecond {
		n++
		addrs := make([]string, 0, n)
		for i := range n {
			addrs = append(addrs, fmt.Sprintf("10.0.%d.%d", i/250, i%250+1))
		}
		w.snap <- []model.Service{svc(model.SourceConsul, "a.service.consul", addrs...)}
		time.Sleep(5 * time.Millisecond)
	}
	elapsed := time.Since(start)
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		last := len(built) > 0 && built[len(built)-1] == n
		count := len(built)
		mu.Unlock()
		if last {
			// Each build takes at least 30ms and is followed by Pace×30ms of rest.
			if most := int(elapsed/((Pace+1)*30*time.Millisecond)) + 2; count > most {
				t.Fatalf("%d catalogs for %d changes in %s, want at most %d", count, n, elapsed.Round(time.Millisecond), most)
			}
			t.Logf("%d changes in %s → %d catalogs", n, elapsed.Round(time.Millisecond), count)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the last change (%d endpoints) never reached a catalog; built %v", n, built)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
