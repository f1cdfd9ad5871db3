// Package eureka watches a Netflix Eureka registry over its REST API and publishes its apps,
// UP instances only, as model services named "<app in lower case>.<Domain>" ("orders.eureka").
//
// Sync: like Eureka's own clients, the watcher fetches the whole registry once (GET /apps), then
// polls for changes (GET /apps/delta) every PollInterval (1s, not the clients' 30s, so changes
// reach the mesh fast). It applies each delta's ADDED, MODIFIED and DELETED instances to its
// copy of the registry, which holds instances of every status, and compares its copy's hash
// code (the count of instances per status, "DOWN_1_UP_3_") with the delta's apps__hashcode.
// On a mismatch the delta is discarded and the registry fetched whole. It also fetches whole
// after any failed request, when it has not synced for longer than Eureka keeps deltas, and
// every ResyncInterval; and on every poll, for ResyncInterval, after the server refused a
// delta with 403 (eureka.server.disable-delta) but served the whole registry.
//
// Failures: when Eureka is down, slow, answers an error or something that is not its JSON,
// the watcher publishes nothing (the last snapshot stays in force), logs a warning naming
// the URL and the likely fix, tries the next of Config.URLs, and retries with backoff (100ms
// doubling to 3s, so a recovered Eureka is seen within about 3s). Answers over
// MaxResponseBytes are rejected the same way. A Eureka server that restarts empty is not a
// failure: its empty registry is published, as its own clients would see it; Eureka guards
// against that itself (eureka.server.wait-time-in-ms-when-sync-empty, self-preservation).
//
// Mapping, per app:
//   - An instance's port is its non-secure port when that is enabled (port.@enabled, true by
//     default), else its secure port when that is enabled (securePort.@enabled, false by
//     default); with neither it is skipped.
//   - The protocol comes from the metadata key "protocol" (http, http2, grpc, tcp, …; HTTP when
//     absent). On a secure port the instance speaks TLS itself, so the protocol is HTTPS, or
//     TLS when the metadata names a protocol that is not HTTP-based.
//   - The service has one port, named after its protocol in lower case: the port most
//     instances use (ties: the lowest), with the protocol most use. Each endpoint keeps its
//     own port. When some instances serve only a secure port and others a non-secure one,
//     the majority (ties: non-secure) wins and the rest are skipped: plaintext must not be
//     sent to a TLS port, nor the reverse.
//   - Metadata becomes endpoint labels; "locality" is the endpoint's locality; an instance is
//     meshed (gets Istio mTLS) when its metadata key Config.MeshedMetaKey is "true".
//   - ipAddr must be an IP address. Instances with a bad address, a port outside 1-65535, or
//     an instance ID seen twice in one app are skipped with a reason (see Stats and Skipped), as are apps
//     whose name is no DNS label (MY_APP).
//   - An app with instances but none UP keeps its service with no endpoints, so callers get
//     "no healthy upstream" rather than an unknown host.
package eureka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
)

// Defaults.
const (
	DefaultDomain           = "eureka"
	DefaultMeshedMetaKey    = "mesh"
	DefaultPollInterval     = time.Second
	DefaultRequestTimeout   = 10 * time.Second
	DefaultResyncInterval   = 5 * time.Minute
	DefaultMaxResponseBytes = 256 << 20 // GET /apps for 100,000 instances is about 75 MB
	DefaultDebounce         = 50 * time.Millisecond
)

// deltaHorizon bounds how long the watcher relies on deltas without a successful fetch.
// Eureka keeps changes in its delta queue for 3 minutes
// (eureka.server.retention-time-in-m-s-in-delta-queue); a copy older than that could miss some.
const deltaHorizon = time.Minute

// Config configures a Watcher.
type Config struct {
	// URLs of Eureka's REST API, each the base that /apps hangs off, e.g.
	// "http://127.0.0.1:8761/eureka" (Spring Cloud's eureka.client.service-url). The watcher
	// uses one at a time and moves to the next when a fetch fails. Credentials may be given
	// in the URL (http://user:password@host:8761/eureka); logs redact them.
	URLs []string
	// Domain is appended to app names to form host names (default "eureka").
	Domain string
	// MeshedMetaKey names the metadata key that marks a meshed instance (default "mesh").
	MeshedMetaKey string
	// PollInterval is the time between delta fetches (default 1s).
	PollInterval time.Duration
	// RequestTimeout bounds each request, reading the answer included (default 10s).
	RequestTimeout time.Duration
	// ResyncInterval is how often the whole registry is fetched even when deltas check out
	// (default 5m).
	ResyncInterval time.Duration
	// MaxResponseBytes bounds an answer; larger ones are rejected (default 256 MiB, room for
	// some 300,000 instances).
	MaxResponseBytes int64
	// Debounce is the longest a change waits before it is published (default 50ms); changes
	// that arrive meanwhile are published with it.
	Debounce time.Duration
	// HTTPClient makes the requests (default: a client of the watcher's own). Its Timeout
	// should be zero or above RequestTimeout.
	HTTPClient *http.Client
	Logger     *slog.Logger
}

func (c *Config) validate() ([]*url.URL, error) {
	if len(c.URLs) == 0 {
		return nil, errors.New("eureka: URLs is empty; set Eureka's REST base, e.g. http://127.0.0.1:8761/eureka")
	}
	urls := make([]*url.URL, 0, len(c.URLs))
	for _, raw := range c.URLs {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("eureka: URL %q: %w", raw, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("eureka: URL %s: want http(s)://host:port/path, e.g. http://127.0.0.1:8761/eureka", u.Redacted())
		}
		urls = append(urls, u)
	}
	if c.Domain == "" {
		c.Domain = DefaultDomain
	}
	if !model.ValidHostname(c.Domain) {
		return nil, fmt.Errorf("eureka: Domain %q is not a DNS name (lowercase letters, digits, '-' and '.')", c.Domain)
	}
	if c.MeshedMetaKey == "" {
		c.MeshedMetaKey = DefaultMeshedMetaKey
	}
	if c.PollInterval <= 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.ResyncInterval <= 0 {
		c.ResyncInterval = DefaultResyncInterval
	}
	if c.MaxResponseBytes <= 0 {
		c.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if c.Debounce <= 0 {
		c.Debounce = DefaultDebounce
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return urls, nil
}

// Stats is what a watcher has done since New.
type Stats struct {
	// URL is the Eureka URL in use, password redacted.
	URL string `json:"url"`
	// FullFetches and DeltaFetches count successful fetches of the whole registry and of
	// deltas that were applied.
	FullFetches  uint64 `json:"full_fetches"`
	DeltaFetches uint64 `json:"delta_fetches"`
	// HashMismatches counts deltas discarded because the hash code did not match; each is
	// followed by a full fetch.
	HashMismatches uint64 `json:"hash_mismatches"`
	// Failures counts failed fetches by reason (FailureUnreachable, FailureTimeout, …).
	Failures map[string]uint64 `json:"failures,omitempty"`
	// Skipped counts, by reason, the UP instances left out of the current snapshot (for
	// "invalid host name": the services), and the entries of the last answer that could not
	// be read at all.
	Skipped map[string]int `json:"skipped,omitempty"`
	// Stale is true while the last fetch failed: the published snapshot may be out of date.
	Stale     bool      `json:"stale"`
	LastSync  time.Time `json:"last_sync,omitzero"`
	LastError string    `json:"last_error,omitempty"`
}

// Watcher publishes Eureka's services. Create it with New, run it with Run.
type Watcher struct {
	cfg    Config
	urls   []*url.URL
	client *client

	mu      sync.Mutex
	stats   Stats
	skipped []model.Skipped // the UP instances (and apps) the current snapshot leaves out
}

// New validates cfg and sets up the HTTP client; it does not contact Eureka.
func New(cfg Config) (*Watcher, error) {
	urls, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	c := &client{http: cfg.HTTPClient, timeout: cfg.RequestTimeout, maxBytes: cfg.MaxResponseBytes}
	if c.http == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = cfg.RequestTimeout
		c.http, c.owned = &http.Client{Transport: tr}, true
	}
	return &Watcher{cfg: cfg, urls: urls, client: c, stats: Stats{URL: urls[0].Redacted()}}, nil
}

// Source names the registry.
func (w *Watcher) Source() model.Source { return model.SourceEureka }

// Stats returns a copy of the watcher's counters.
func (w *Watcher) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.stats
	s.Failures = maps.Clone(s.Failures)
	s.Skipped = maps.Clone(s.Skipped)
	return s
}

// syncState is what Run carries from one fetch to the next.
type syncState struct {
	reg      *registry // nil until the first full fetch
	url      int       // index into urls of the server in use
	needFull bool
	lastOK   time.Time // last successful fetch
	lastFull time.Time // last successful full fetch
	// noDeltasUntil is set when the server refuses deltas: until then, every fetch is full.
	noDeltasUntil time.Time
	// unchanged is true when the last sync applied a delta that changed nothing (see
	// registry.changedBy): the registry copy holds what it held, and so does its snapshot.
	unchanged bool
}

// Run watches until ctx ends; call it once at a time. Failed fetches are logged and retried
// with backoff; the last published snapshot stays in force meanwhile. publish gets a copy of
// its own, which it may change. Run returns nil when ctx ends.
func (w *Watcher) Run(ctx context.Context, publish func([]model.Service)) error {
	defer w.client.closeIdle()
	m := mapping{domain: w.cfg.Domain, meshedMetaKey: w.cfg.MeshedMetaKey}
	st := &syncState{needFull: true}
	bo := newBackoff()

	poll := time.NewTimer(0)
	defer poll.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	debouncing := false

	var (
		pending      []model.Service // the newest snapshot, published when debounce fires
		havePending  bool
		published    []model.Service
		hasPublished bool
		lastSkipped  = map[string]bool{}
	)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-debounce.C:
			debouncing = false
			if hasPublished && equalServices(published, pending) {
				continue
			}
			published, hasPublished = pending, true
			publish(cloneServices(pending))
		case <-poll.C:
			doc, err := w.sync(ctx, st)
			if ctx.Err() != nil {
				return nil
			}
			if err != nil {
				w.failed(st, err, bo.peek())
				poll.Reset(bo.next())
				continue
			}
			bo.reset()
			poll.Reset(w.cfg.PollInterval)
			if st.unchanged && havePending {
				// Nothing changed: at 100,000 instances, building the snapshot again costs
				// more than all the rest of an idle poll.
				continue
			}

			built := time.Now()
			snap, skipped := st.reg.services(m)
			if rest := bridge.Paced(time.Since(built)); rest > w.cfg.PollInterval {
				poll.Reset(rest) // a large registry: rest in proportion to the build
			}
			lastSkipped = w.logSkipped(skipped, lastSkipped)
			w.mu.Lock()
			w.stats.Skipped = countReasons(skipped, doc.Unreadable)
			w.skipped = skipped
			w.mu.Unlock()
			if havePending && equalServices(pending, snap) {
				continue
			}
			pending, havePending = snap, true
			if !debouncing {
				debouncing = true
				debounce.Reset(w.cfg.Debounce)
			}
		}
	}
}

// sync brings st.reg up to date with one delta fetch, or a full fetch when one is due or the
// delta does not check out. It returns the answer that was applied.
func (w *Watcher) sync(ctx context.Context, st *syncState) (*document, error) {
	now := time.Now()
	st.unchanged = false
	full := st.needFull || st.reg == nil || now.Before(st.noDeltasUntil) ||
		now.Sub(st.lastOK) > deltaHorizon || now.Sub(st.lastFull) >= w.cfg.ResyncInterval
	deltasForbidden := false
	if !full {
		doc, err := w.fetch(ctx, st, "apps/delta")
		switch fe, _ := errors.AsType[*fetchError](err); {
		case err == nil:
			changed := st.reg.changedBy(doc)
			next := st.reg
			if changed {
				next = st.reg.apply(doc)
			}
			got := next.hashCode()
			if doc.HasHashCode && got == doc.HashCode {
				st.reg, st.lastOK = next, time.Now()
				st.unchanged = !changed && len(doc.Unreadable) == 0
				w.succeeded(st, func(s *Stats) { s.DeltaFetches++ })
				return doc, nil
			}
			w.mu.Lock()
			w.stats.HashMismatches++
			w.mu.Unlock()
			w.cfg.Logger.Warn("eureka delta does not match the registry's hash code; fetching the whole registry",
				"url", w.urls[st.url].Redacted(), "local_hash", got, "server_hash", doc.HashCode,
				"fix", "none if rare; if it repeats, a proxy or cache between meshturbo and Eureka serves inconsistent /apps and /apps/delta answers")
		case fe != nil && fe.Status == http.StatusForbidden:
			// A server with eureka.server.disable-delta answers 403 to deltas only; if the
			// full fetch below works, that is what this was.
			deltasForbidden = true
		default:
			return nil, err
		}
	}
	doc, err := w.fetch(ctx, st, "apps")
	if err != nil {
		return nil, err
	}
	st.reg = newRegistry(doc)
	st.needFull = false
	st.lastOK = time.Now()
	st.lastFull = st.lastOK
	if deltasForbidden {
		st.noDeltasUntil = st.lastOK.Add(w.cfg.ResyncInterval)
		w.cfg.Logger.Info("eureka refuses deltas (eureka.server.disable-delta?); fetching the whole registry on every poll",
			"url", w.urls[st.url].Redacted(), "retry_deltas_in", w.cfg.ResyncInterval)
	}
	w.succeeded(st, func(s *Stats) { s.FullFetches++ })
	return doc, nil
}

// fetch gets and decodes one answer of the server in use.
func (w *Watcher) fetch(ctx context.Context, st *syncState, path string) (*document, error) {
	base := w.urls[st.url]
	body, err := w.client.get(ctx, base, path)
	if err != nil {
		return nil, err
	}
	doc, err := decodeApps(body)
	if err != nil {
		return nil, &fetchError{URL: base.JoinPath(path).Redacted(), Reason: FailureBadJSON, Err: err,
			Fix: "the answer is not Eureka's JSON: check that the URL is Eureka's REST base and that no proxy rewrites its answers"}
	}
	return doc, nil
}

func (w *Watcher) succeeded(st *syncState, count func(*Stats)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	count(&w.stats)
	w.stats.Stale = false
	w.stats.LastSync = st.lastOK
	w.stats.LastError = ""
}

// failed records a failed fetch, logs it, and moves to the next server; the next fetch is
// a full one.
func (w *Watcher) failed(st *syncState, err error, retryIn time.Duration) {
	reason, fix := FailureUnreachable, ""
	var fe *fetchError
	if errors.As(err, &fe) {
		reason, fix = fe.Reason, fe.Fix
	}
	failedURL := w.urls[st.url].Redacted()
	st.needFull = true
	st.url = (st.url + 1) % len(w.urls)

	w.mu.Lock()
	if w.stats.Failures == nil {
		w.stats.Failures = map[string]uint64{}
	}
	w.stats.Failures[reason]++
	w.stats.Stale = true
	w.stats.LastError = err.Error()
	w.stats.URL = w.urls[st.url].Redacted()
	w.mu.Unlock()

	args := []any{"url", failedURL, "reason", reason, "error", err, "fix", fix, "retry_in", retryIn}
	if len(w.urls) > 1 {
		args = append(args, "next_url", w.urls[st.url].Redacted())
	}
	w.cfg.Logger.Warn("eureka fetch failed; keeping the last snapshot", args...)
}

// logSkipped warns about entries skipped now that were not skipped in the previous snapshot,
// so that a bad instance is reported once, not on every poll. It returns the current set.
func (w *Watcher) logSkipped(skipped []model.Skipped, before map[string]bool) map[string]bool {
	now := make(map[string]bool, len(skipped))
	for _, s := range skipped {
		key := s.String()
		now[key] = true
		if !before[key] {
			w.cfg.Logger.Warn("eureka instance skipped", "service", s.Hostname, "instance", s.ID, "reason", s.Reason)
		}
	}
	return now
}

// cloneServices copies services deep enough that changing the copy leaves svcs alone.
func cloneServices(svcs []model.Service) []model.Service {
	out := slices.Clone(svcs)
	for i := range out {
		s := &out[i]
		s.Ports = slices.Clone(s.Ports)
		s.Labels = maps.Clone(s.Labels)
		s.Endpoints = slices.Clone(s.Endpoints)
		for j := range s.Endpoints {
			e := &s.Endpoints[j]
			e.Ports = maps.Clone(e.Ports)
			e.Labels = maps.Clone(e.Labels)
		}
	}
	return out
}

func equalServices(a, b []model.Service) bool {
	return slices.EqualFunc(a, b, func(x, y model.Service) bool { return x.Equal(&y) })
}

// backoff doubles from 100ms to 3s. The cap is low because a poll is cheap and a recovered
// Eureka should be seen within seconds.
type backoff struct{ cur time.Duration }

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 3 * time.Second
)

func newBackoff() *backoff             { return &backoff{cur: backoffMin} }
func (b *backoff) reset()              { b.cur = backoffMin }
func (b *backoff) peek() time.Duration { return b.cur }

// next returns the wait before the next try and doubles it for the one after.
func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(2*b.cur, backoffMax)
	return d
}

var (
	_ bridge.HealthReporter = (*Watcher)(nil)
	_ bridge.SkipReporter   = (*Watcher)(nil)
)

// Skipped lists the UP instances (and the apps) the current snapshot leaves out, and why.
func (w *Watcher) Skipped() []model.Skipped {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.skipped)
}

// Health reports whether the last fetch from Eureka succeeded.
func (w *Watcher) Health() bridge.Health {
	s := w.Stats()
	return bridge.Health{Connected: !s.Stale && !s.LastSync.IsZero(), LastContact: s.LastSync, LastError: s.LastError}
}
