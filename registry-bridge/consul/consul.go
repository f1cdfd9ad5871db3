// Package consul watches a Consul catalog with blocking queries and publishes its services,
// passing instances only, as model services named "<service>.<Domain>".
//
// Mapping: the service port is the port most instances use (ties: the lowest); each endpoint
// keeps its own port. The port protocol comes from the instance meta key "protocol" (http,
// http2, grpc, tcp, …; TCP when absent). An instance is meshed (gets Istio mTLS) when its meta
// key Config.MeshedMetaKey is "true". Tags of the form key=value and meta become endpoint labels.
package consul

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
)

// Config configures a Watcher.
type Config struct {
	// Address of the Consul HTTP API, e.g. "127.0.0.1:8500".
	Address    string
	Datacenter string
	// Namespace and Partition are Consul Enterprise's; empty means the default.
	Namespace string
	Partition string
	Token     string
	// TLS, when set, makes the client speak HTTPS to Consul.
	TLS *TLS
	// Domain is appended to service names to form host names (default "service.consul").
	Domain string
	// MeshedMetaKey names the instance meta key that marks a meshed instance (default "mesh").
	MeshedMetaKey string
	// WaitTime bounds each blocking query (default 5m, as Consul's own default).
	WaitTime time.Duration
	// Debounce is the quiet period before a snapshot is published (default 50ms); the next
	// snapshot is not built before bridge.Paced(the cost of the last) has passed.
	Debounce time.Duration
	// InitialSync bounds how long the first snapshot waits for every service's first health
	// answer (default 30s); services still unanswered then join when they answer.
	InitialSync time.Duration
	Logger      *slog.Logger
}

func (c *Config) validate() error {
	if c.Address == "" {
		return errors.New("consul: Address is empty; set the Consul HTTP address, e.g. 127.0.0.1:8500")
	}
	if c.Domain == "" {
		c.Domain = "service.consul"
	}
	if c.MeshedMetaKey == "" {
		c.MeshedMetaKey = "mesh"
	}
	if c.WaitTime <= 0 {
		c.WaitTime = 5 * time.Minute
	}
	if c.Debounce <= 0 {
		c.Debounce = 50 * time.Millisecond
	}
	if c.InitialSync <= 0 {
		c.InitialSync = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// TLS configures HTTPS to Consul.
type TLS struct {
	CAFile, CertFile, KeyFile string
	ServerName                string
	InsecureSkipVerify        bool
}

// Watcher publishes Consul's services. Create it with New, run it with Run.
type Watcher struct {
	cfg    Config
	client *api.Client

	mu     sync.Mutex
	health bridge.Health
}

var _ bridge.HealthReporter = (*Watcher)(nil)

// Health reports whether Consul answered the last query.
func (w *Watcher) Health() bridge.Health {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.health
}

// contact records the outcome of a query.
func (w *Watcher) contact(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		w.health.Connected, w.health.LastError = false, err.Error()
		return
	}
	w.health.Connected, w.health.LastContact, w.health.LastError = true, time.Now(), ""
}

// New validates cfg and creates the API client; it does not contact Consul.
func New(cfg Config) (*Watcher, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	acfg := api.DefaultConfig()
	acfg.Address = cfg.Address
	acfg.Datacenter = cfg.Datacenter
	acfg.Token = cfg.Token
	acfg.Namespace = cfg.Namespace
	acfg.Partition = cfg.Partition
	if cfg.TLS != nil {
		acfg.Scheme = "https"
		acfg.TLSConfig = api.TLSConfig{
			Address: cfg.TLS.ServerName, CAFile: cfg.TLS.CAFile, CertFile: cfg.TLS.CertFile,
			KeyFile: cfg.TLS.KeyFile, InsecureSkipVerify: cfg.TLS.InsecureSkipVerify,
		}
	}
	client, err := api.NewClient(acfg)
	if err != nil {
		return nil, fmt.Errorf("consul: client for %s: %w", cfg.Address, err)
	}
	return &Watcher{cfg: cfg, client: client}, nil
}

// Source names the registry.
func (w *Watcher) Source() model.Source { return model.SourceConsul }

// run state shared by the catalog loop and the per-service health loops.
type state struct {
	mu        sync.Mutex
	instances map[string][]*api.ServiceEntry // service name → passing instances
	pending   map[string]bool                // services whose first health answer is outstanding
	listed    bool                           // the catalog has been listed once
	changed   chan struct{}
}

func (s *state) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Run watches until ctx ends. Errors talking to Consul are logged and retried with backoff;
// the last published snapshot stays in force meanwhile.
func (w *Watcher) Run(ctx context.Context, publish func([]model.Service)) error {
	st := &state{instances: map[string][]*api.ServiceEntry{}, pending: map[string]bool{}, changed: make(chan struct{}, 1)}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	wg.Add(1)
	go func() {
		defer wg.Done()
		w.watchCatalog(ctx, st, &wg)
	}()

	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	initialDeadline := time.NewTimer(w.cfg.InitialSync)
	defer initialDeadline.Stop()
	var (
		last       []model.Service
		published  bool
		expired    bool      // InitialSync has passed
		firstDirty time.Time // first change not yet published; zero when none
		notBefore  time.Time // the rest after the last snapshot ends (bridge.Paced)
	)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-st.changed:
			// Quiet period after each change, but never more than 20 of them after the first
			// unpublished change, so a steady stream of edits still gets published.
			if firstDirty.IsZero() {
				firstDirty = time.Now()
			}
			if time.Since(firstDirty) < 20*w.cfg.Debounce {
				debounce.Reset(max(w.cfg.Debounce, time.Until(notBefore)))
			}
			continue
		case <-debounce.C:
		case <-initialDeadline.C:
			expired = true
			if published {
				continue
			}
		}
		built := time.Now()
		st.mu.Lock()
		// The first snapshot waits for every service's first health answer (a partial first
		// view would remove services from the mesh), up to InitialSync; after that a new
		// service simply joins once its first answer arrives.
		ready := st.listed && (published || len(st.pending) == 0 || expired)
		var snap []model.Service
		var missing int
		if ready {
			snap = w.snapshot(st.instances)
			missing = len(st.pending)
		}
		st.mu.Unlock()
		if !ready {
			// The next answer starts a new quiet period: without this, once the first 20
			// Debounce had passed, a first sync longer than that would wait for InitialSync.
			firstDirty = time.Time{}
			continue
		}
		firstDirty = time.Time{}
		if !published && missing > 0 {
			w.cfg.Logger.Warn("consul: publishing without services whose health never answered", "pending", missing,
				"fix", "if many services are watched, raise limits.http_max_conns_per_client on the Consul agent above the service count")
		}
		if last != nil && equalServices(last, snap) {
			continue
		}
		last, published = snap, true
		publish(snap)
		notBefore = time.Now().Add(bridge.Paced(time.Since(built)))
	}
}

// watchCatalog follows the list of service names and runs one health watch per service.
func (w *Watcher) watchCatalog(ctx context.Context, st *state, wg *sync.WaitGroup) {
	healthStops := map[string]context.CancelFunc{}
	defer func() {
		for _, stop := range healthStops {
			stop()
		}
	}()
	var index uint64
	bo := newBackoff()
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: w.cfg.WaitTime, AllowStale: true}).WithContext(ctx)
		names, meta, err := w.client.Catalog().Services(q)
		if ctx.Err() != nil {
			return
		}
		w.contact(err)
		if err != nil {
			w.cfg.Logger.Warn("consul catalog query failed; keeping the last snapshot", "address", w.cfg.Address, "error", err,
				"retry_in", bo.peek(), "fix", "check that the Consul HTTP API answers at this address (GET /v1/status/leader)")
			// The agent answering next may be a restarted one whose index starts below ours;
			// a blocking query at our index would then hang until WaitTime. Re-read at once.
			index = 0
			bo.wait(ctx)
			continue
		}
		bo.reset()
		w.cfg.Logger.Debug("consul catalog", "services", len(names), "index", meta.LastIndex, "previous_index", index)
		index = NextIndex(index, meta.LastIndex)

		st.mu.Lock()
		for name := range names {
			if name == "consul" {
				continue
			}
			if _, running := healthStops[name]; running {
				continue
			}
			hctx, stop := context.WithCancel(ctx)
			healthStops[name] = stop
			st.pending[name] = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				w.watchHealth(hctx, st, name)
			}()
		}
		for name, stop := range healthStops {
			if _, ok := names[name]; !ok {
				stop()
				delete(healthStops, name)
				delete(st.instances, name)
				delete(st.pending, name)
			}
		}
		st.listed = true
		st.mu.Unlock()
		st.notify()
	}
}

// watchHealth follows the passing instances of one service.
func (w *Watcher) watchHealth(ctx context.Context, st *state, name string) {
	var index uint64
	bo := newBackoff()
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: w.cfg.WaitTime, AllowStale: true}).WithContext(ctx)
		entries, meta, err := w.client.Health().Service(name, "", true, q)
		if ctx.Err() != nil {
			return
		}
		w.contact(err)
		if err != nil {
			w.cfg.Logger.Warn("consul health query failed; keeping the last snapshot", "service", name, "error", err, "retry_in", bo.peek())
			index = 0 // as in watchCatalog: the next agent may have restarted with a lower index
			bo.wait(ctx)
			continue
		}
		bo.reset()
		index = NextIndex(index, meta.LastIndex)
		slim := make([]*api.ServiceEntry, len(entries))
		for i, e := range entries {
			slim[i] = slimEntry(e)
		}
		st.mu.Lock()
		if ctx.Err() == nil { // the service may have been removed meanwhile
			st.instances[name] = slim
			delete(st.pending, name)
		}
		st.mu.Unlock()
		st.notify()
	}
}

// slimEntry keeps only what the mapping reads. A health entry also carries the node's meta,
// tagged addresses and every check with its output; with 100,000 instances that is most of
// the process's memory.
func slimEntry(e *api.ServiceEntry) *api.ServiceEntry {
	out := &api.ServiceEntry{Node: &api.Node{}, Service: &api.AgentService{}}
	if e.Node != nil {
		out.Node.Address = e.Node.Address
	}
	if e.Service != nil {
		out.Service.ID, out.Service.Service = e.Service.ID, e.Service.Service
		out.Service.Address, out.Service.Port = e.Service.Address, e.Service.Port
		out.Service.Meta, out.Service.Tags, out.Service.Weights = e.Service.Meta, e.Service.Tags, e.Service.Weights
	}
	return out
}

func isOwn(e *api.ServiceEntry) bool { return e.Service.Meta[ReverseMetaKey] == "true" }

// NextIndex applies Consul's rules for blocking-query indexes: an index that goes backwards
// (a snapshot restore, a new leader with an older raft log) resets the watch to 0 so the next
// query returns at once with the full current state; an index of 0 is treated as 1 so the
// next query still blocks.
func NextIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	default:
		return got
	}
}

func (w *Watcher) snapshot(instances map[string][]*api.ServiceEntry) []model.Service {
	out := make([]model.Service, 0, len(instances))
	for name, entries := range instances {
		// Instances meshturbo registered itself are mesh services: importing them back
		// would loop them into the mesh as if they were outside it.
		if slices.ContainsFunc(entries, isOwn) {
			entries = slices.DeleteFunc(slices.Clone(entries), isOwn)
		}
		// With no passing instance the port is unknown: the service is left out, and the
		// bridge keeps serving it with no endpoints for its retention time.
		if len(entries) == 0 {
			continue
		}
		out = append(out, w.toService(name, entries))
	}
	slices.SortFunc(out, func(a, b model.Service) int { return cmp.Compare(a.Hostname, b.Hostname) })
	return out
}

func (w *Watcher) toService(name string, entries []*api.ServiceEntry) model.Service {
	svc := model.Service{
		Hostname: strings.ToLower(name) + "." + w.cfg.Domain,
		Source:   model.SourceConsul,
	}
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b *api.ServiceEntry) int { return cmp.Compare(a.Service.ID, b.Service.ID) })

	proto := model.ProtocolTCP
	counts := map[int]int{}
	for _, e := range sorted {
		counts[e.Service.Port]++
		if p := e.Service.Meta["protocol"]; p != "" && proto == model.ProtocolTCP {
			proto = model.ParseProtocol(p)
		}
	}
	portName := strings.ToLower(string(proto))
	svc.Ports = []model.Port{{Name: portName, Number: uint32(clampPort(mostCommon(counts))), Protocol: proto}}

	for _, e := range sorted {
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		ep := model.Endpoint{
			ID:       e.Service.ID,
			Address:  addr,
			Ports:    map[string]uint32{portName: uint32(clampPort(e.Service.Port))},
			Labels:   labels(e.Service),
			Locality: e.Service.Meta["locality"],
			Weight:   uint32(max(e.Service.Weights.Passing, 0)),
			Meshed:   e.Service.Meta[w.cfg.MeshedMetaKey] == "true",
		}
		svc.Endpoints = append(svc.Endpoints, ep)
	}
	return svc
}

// clampPort maps out-of-range ports to 0, which validation rejects with a reason.
func clampPort(p int) int {
	if p < 0 || p > 65535 {
		return 0
	}
	return p
}

func mostCommon(counts map[int]int) int {
	best, bestN := 0, 0
	for p, n := range counts {
		if n > bestN || (n == bestN && p < best) {
			best, bestN = p, n
		}
	}
	return best
}

func labels(s *api.AgentService) map[string]string {
	out := map[string]string{}
	maps.Copy(out, s.Meta)
	for _, t := range s.Tags {
		if k, v, ok := strings.Cut(t, "="); ok {
			out[k] = v
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

func equalServices(a, b []model.Service) bool {
	return slices.EqualFunc(a, b, func(x, y model.Service) bool {
		x.Normalize()
		y.Normalize()
		return x.Equal(&y)
	})
}

// backoff doubles from 100ms to 2s: short enough that a registry coming back is seen within
// seconds.
type backoff struct{ next time.Duration }

func newBackoff() *backoff             { return &backoff{next: 100 * time.Millisecond} }
func (b *backoff) reset()              { b.next = 100 * time.Millisecond }
func (b *backoff) peek() time.Duration { return b.next }
func (b *backoff) wait(ctx context.Context) {
	t := time.NewTimer(b.next)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	b.next = min(2*b.next, 2*time.Second)
}
