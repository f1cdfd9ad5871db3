// Package bridge turns what service registries hold into Istio config. Each registry has a
// watcher in a sub-package (consul/, …) that publishes complete snapshots of its source; the
// Bridge validates and merges them into one model.Catalog, and Translate turns the catalog
// into ServiceEntry resources for the xDS server.
//
// Conflict rule: when two sources claim the same host name, the source listed first in
// Config.Watchers wins and the other's service is reported as skipped; with
// Config.Merge = model.MergeUnion the endpoints of both are served instead.
//
// Retention: a service that disappears from its registry (its last instance deregistered) is
// kept with no endpoints for Config.Retention before it is removed. Callers meanwhile get
// Envoy's "no healthy upstream" instead of a missing route, and a redeploy that briefly
// removes every instance changes only endpoints (a cheap EDS push in istiod) rather than
// removing and re-adding the service (a full push).
package bridge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/meshturbo/meshturbo/model"
)

// Watcher watches one registry. Run blocks until ctx ends, calling publish with the complete
// set of services of its source whenever it changes. It never publishes a partial or empty
// view because the registry is unreachable: it keeps quiet and retries instead.
type Watcher interface {
	Source() model.Source
	Run(ctx context.Context, publish func([]model.Service)) error
}

// Health is a watcher's view of its registry connection.
type Health struct {
	// Connected is false while the registry does not answer; what was published last
	// stays in force meanwhile.
	Connected   bool
	LastContact time.Time
	LastError   string
}

// HealthReporter is implemented by watchers that can tell whether their registry answers.
// The bridge reports a source whose watcher says it is not connected as stale.
type HealthReporter interface {
	Health() Health
}

// SkipReporter is implemented by watchers that leave registry entries out before they
// publish: entries no model.Service can carry, such as a Dubbo provider URL that does not
// parse or a Eureka instance whose address is no IP. The bridge reports them next to the ones
// its own validation skips, in Status (the admin API) and so in the metrics.
type SkipReporter interface {
	Skipped() []model.Skipped
}

// Config configures a Bridge.
type Config struct {
	// Watchers in priority order (see the package doc for the conflict rule).
	Watchers []Watcher
	// OnCatalog receives every new catalog. It is called from one goroutine, never concurrently.
	OnCatalog func(*model.Catalog)
	// Debounce is how long the bridge waits for more changes before building a catalog.
	Debounce time.Duration
	// Merge is the host name conflict rule (default model.MergePriority).
	Merge model.Merge
	// Retention is how long a vanished service is kept with no endpoints (default 10m).
	Retention time.Duration
	// Now is the clock (default time.Now); tests inject their own.
	Now    func() time.Time
	Logger *slog.Logger
}

func (c *Config) validate() error {
	if len(c.Watchers) == 0 {
		return errors.New("bridge: no registry watchers configured")
	}
	if c.OnCatalog == nil {
		return errors.New("bridge: Config.OnCatalog is nil")
	}
	if c.Debounce <= 0 {
		c.Debounce = 50 * time.Millisecond
	}
	if c.Retention <= 0 {
		c.Retention = 10 * time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// SourceStatus is what the bridge knows about one source.
type SourceStatus struct {
	Source    model.Source    `json:"source"`
	Synced    bool            `json:"synced"`
	LastSync  time.Time       `json:"last_sync,omitzero"`
	Services  int             `json:"services"`
	Endpoints int             `json:"endpoints"`
	Skipped   []model.Skipped `json:"skipped,omitempty"`
	// SyncLatency is the time from the source's last change to the catalog holding it.
	SyncLatency time.Duration `json:"sync_latency_ns"`
	// Stale is true while the registry does not answer: the last snapshot is being served.
	Stale       bool      `json:"stale"`
	LastContact time.Time `json:"last_contact,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// Bridge runs the watchers and merges their snapshots.
type Bridge struct {
	cfg    Config
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{}

	mu        sync.Mutex
	snapshots map[model.Source][]model.Service
	retained  map[model.Source]map[string]retainedService
	pending   map[model.Source]time.Time // changes published but not yet in a catalog
	status    map[model.Source]*SourceStatus
	catalog   *model.Catalog
}

// New validates cfg and starts every watcher. Close stops them.
func New(cfg Config) (*Bridge, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Bridge{
		cfg:       cfg,
		cancel:    cancel,
		kick:      make(chan struct{}, 1),
		snapshots: map[model.Source][]model.Service{},
		retained:  map[model.Source]map[string]retainedService{},
		pending:   map[model.Source]time.Time{},
		status:    map[model.Source]*SourceStatus{},
	}
	for _, w := range cfg.Watchers {
		src := w.Source()
		if _, dup := b.status[src]; dup {
			cancel()
			return nil, fmt.Errorf("bridge: source %s configured twice", src)
		}
		b.status[src] = &SourceStatus{Source: src}
	}
	for _, w := range cfg.Watchers {
		b.wg.Add(1)
		go b.runWatcher(ctx, w)
	}
	b.wg.Add(1)
	go b.merge(ctx)
	return b, nil
}

func (b *Bridge) runWatcher(ctx context.Context, w Watcher) {
	defer b.wg.Done()
	src := w.Source()
	var logged map[model.Skipped]bool // skips already logged: a bad entry is reported once, not on every change
	err := w.Run(ctx, func(svcs []model.Service) {
		clean, skipped := model.Sanitize(svcs)
		now := make(map[model.Skipped]bool, len(skipped))
		for _, s := range skipped {
			now[s] = true
			if !logged[s] {
				b.cfg.Logger.Warn("registry entry skipped", "source", src, "service", s.Hostname, "instance", s.ID, "reason", s.Reason)
			}
		}
		logged = now
		eps := 0
		for _, s := range clean {
			eps += len(s.Endpoints)
		}
		b.mu.Lock()
		b.retain(src, clean)
		b.snapshots[src] = clean
		if _, ok := b.pending[src]; !ok {
			b.pending[src] = time.Now()
		}
		st := b.status[src]
		st.Synced, st.LastSync, st.Services, st.Endpoints, st.Skipped = true, time.Now(), len(clean), eps, skipped
		b.mu.Unlock()
		select {
		case b.kick <- struct{}{}:
		default:
		}
	})
	if err != nil && ctx.Err() == nil {
		b.cfg.Logger.Error("registry watcher stopped", "source", src, "error", err)
		b.mu.Lock()
		b.status[src].LastError = err.Error()
		b.mu.Unlock()
	}
}

// retainedService is a service that left its registry, kept empty until expires.
type retainedService struct {
	svc     model.Service
	expires time.Time
}

// retain records the services of src's previous snapshot that next lacks. Called with b.mu held.
func (b *Bridge) retain(src model.Source, next []model.Service) {
	present := make(map[string]bool, len(next))
	for _, s := range next {
		present[s.Hostname] = true
	}
	kept := b.retained[src]
	if kept == nil {
		kept = map[string]retainedService{}
		b.retained[src] = kept
	}
	for host := range kept {
		if present[host] {
			delete(kept, host) // it is back
		}
	}
	for _, s := range b.snapshots[src] {
		if !present[s.Hostname] {
			s.Endpoints = nil
			kept[s.Hostname] = retainedService{svc: s, expires: b.cfg.Now().Add(b.cfg.Retention)}
		}
	}
}

// services returns every source's services in priority order, retained ones included, and
// when the next retained service expires (zero if none). Called with b.mu held.
func (b *Bridge) services() ([]model.Service, time.Time) {
	now := b.cfg.Now()
	var all []model.Service
	var next time.Time
	for _, w := range b.cfg.Watchers {
		src := w.Source()
		all = append(all, b.snapshots[src]...)
		for host, r := range b.retained[src] {
			if !now.Before(r.expires) {
				delete(b.retained[src], host)
				continue
			}
			all = append(all, r.svc)
			if next.IsZero() || r.expires.Before(next) {
				next = r.expires
			}
		}
	}
	return all, next
}

// Pace is how many times its own cost the merge loop and the watchers rest after building a
// catalog or a snapshot before they build the next, so that each of these stages spends at
// most 1/(Pace+1) of a core however fast the registries change. A catalog of 10,000
// services / 100,000 endpoints costs about 0.1 s to build and serve: under a steady stream of
// changes the bridge then builds about every 0.4 s instead of once per change; a small catalog
// (builds of microseconds) is not slowed at all. A change never waits more than Pace times
// the last build on top of the debounce.
const Pace = 3

// Paced returns how long to wait after a build that took cost, before the next one.
func Paced(cost time.Duration) time.Duration { return Pace * cost }

// merge builds a catalog after each quiet period that follows a change, and again when a
// retained service expires; never sooner than Paced(the last build's cost) after that build.
func (b *Bridge) merge(ctx context.Context) {
	defer b.wg.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	expiry := time.NewTimer(time.Hour)
	expiry.Stop()
	defer timer.Stop()
	defer expiry.Stop()
	var notBefore time.Time // the end of the rest after the last build
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.kick:
			timer.Reset(max(b.cfg.Debounce, time.Until(notBefore)))
			continue
		case <-timer.C:
		case <-expiry.C:
		}
		built := time.Now()
		b.mu.Lock()
		all, next := b.services()
		included := b.pending // the changes this catalog holds
		b.pending = map[model.Source]time.Time{}
		b.mu.Unlock()
		if !next.IsZero() {
			expiry.Reset(next.Sub(b.cfg.Now()))
		}
		cat := model.NewCatalogMerged(all, b.cfg.Merge)
		for _, s := range cat.Skipped {
			b.cfg.Logger.Warn("service skipped", "source", s.Source, "service", s.Hostname, "reason", s.Reason)
		}
		b.mu.Lock()
		b.catalog = cat
		b.mu.Unlock()
		b.cfg.OnCatalog(cat)
		b.mu.Lock()
		for src, since := range included {
			b.status[src].SyncLatency = time.Since(since)
		}
		b.mu.Unlock()
		notBefore = time.Now().Add(Paced(time.Since(built)))
	}
}

// Status returns the status of every source, in priority order.
func (b *Bridge) Status() []SourceStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]SourceStatus, 0, len(b.cfg.Watchers))
	for _, w := range b.cfg.Watchers {
		st := *b.status[w.Source()]
		if hr, ok := w.(HealthReporter); ok {
			h := hr.Health()
			st.Stale = !h.Connected
			st.LastContact = h.LastContact
			if h.LastError != "" {
				st.LastError = h.LastError
			}
		}
		if sr, ok := w.(SkipReporter); ok {
			if more := sr.Skipped(); len(more) > 0 {
				st.Skipped = append(slices.Clip(st.Skipped), more...)
			}
		}
		out = append(out, st)
	}
	return out
}

// Catalog returns the last merged catalog, or nil before the first one.
func (b *Bridge) Catalog() *model.Catalog {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.catalog
}

// Close stops every watcher and waits for them.
func (b *Bridge) Close() error {
	b.cancel()
	b.wg.Wait()
	return nil
}
