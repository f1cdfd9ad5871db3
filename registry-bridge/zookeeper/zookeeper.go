// Package zookeeper watches a ZooKeeper ensemble and publishes the services registered in it
// in two layouts:
//
//   - Dubbo: /dubbo/<interface>/providers/<percent-encoded provider URL>. The providers of one
//     (interface, group, version) are one service, named by DubboHostname, e.g.
//     "org.apache.dubbo.demo.demoservice.dubbo" or "…demoservice.prod.v1-0-0.dubbo". The URL
//     protocol gives the port protocol (dubbo → TCP, tri and grpc → GRPC, rest and http →
//     HTTP; Config.Protocols overrides); the "weight" parameter the endpoint weight (default
//     100, at least 1); providers with enabled=false or disabled=true, or side other than
//     provider, are left out. The interface is the directory name (what Dubbo consumers look
//     up), not the URL's. Endpoint IDs are "ip:port"; labels are the application, group,
//     version and release parameters; "locality" gives the locality.
//   - Curator service discovery (Curator, Spring Cloud Zookeeper, Dubbo 3 application-level
//     discovery): /services/<name>/<id> holding JSON. Each name is a service
//     "<name>.curator"; instances speak HTTP on "port", or HTTPS on "sslPort" when there is no
//     port, unless the payload metadata key "protocol" says otherwise; the payload metadata
//     becomes endpoint labels, its "weight" the weight (default 100) and "locality" the
//     locality; instances with enabled=false, or a metadata instance_status other than UP,
//     are left out. Endpoint IDs are the znode names (Curator's instance IDs).
//
// Both: a service has one port, the protocol most of its instances use (instances of other
// protocols are skipped), numbered as most of them listen (ties: the lowest); each endpoint
// keeps its own port. Of two instances with the same ID or address:port the newest
// registration wins. Hosts must be IP addresses: instances registered by host name are skipped.
// An instance is meshed (Istio mTLS) when its Config.MeshedKey parameter or metadata is "true".
// When two registry services map to one host name, the one whose key sorts first keeps it.
//
// The watcher lists everything once, then follows changes with watches, re-armed after each
// event; a full re-listing runs on every new connection and session and every Config.Resync.
// Nothing is published before the first complete listing, and a listing that fails halfway
// changes nothing: while ZooKeeper is unreachable, or its session expired, the last snapshot
// stays in force. Entries it cannot use are skipped, logged once, counted in Stats and listed
// with their reason by Skipped (which the bridge shows in its status and metrics).
package zookeeper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
)

// Config configures a Watcher.
type Config struct {
	// Servers are the ensemble's client addresses, "host:port" (port 2181 when absent).
	Servers []string
	// SessionTimeout is the session timeout asked of ZooKeeper (default 15s; the server
	// bounds it to 2-20 of its ticks).
	SessionTimeout time.Duration

	// DubboRoot is the Dubbo registry root (default "/dubbo"). DisableDubbo ignores it.
	DubboRoot    string
	DisableDubbo bool
	// DubboDomain ends Dubbo service host names (default "dubbo").
	DubboDomain string
	// Protocols maps Dubbo URL protocols to Istio protocols, over the defaults: dubbo → TCP,
	// tri and grpc → GRPC, rest and http → HTTP, h2c and http2 → HTTP2, https → HTTPS, any
	// other → TCP. For example {"dubbo": model.ProtocolTCP}.
	Protocols map[string]model.Protocol

	// CuratorRoot is the Curator service-discovery base path (default "/services").
	// DisableCurator ignores it.
	CuratorRoot    string
	DisableCurator bool
	// CuratorDomain ends Curator service host names (default "curator").
	CuratorDomain string

	// MeshedKey names the Dubbo URL parameter or Curator metadata key whose value "true" marks
	// an instance that runs a sidecar (default "mesh").
	MeshedKey string
	// MaxNodeData is the largest instance data read, in bytes (default 1 MiB, ZooKeeper's
	// own default limit); bigger instances are skipped.
	MaxNodeData int
	// Resync is the period of full re-listings that catch anything a watch missed (default 60s).
	Resync time.Duration
	// Debounce is the quiet period before a snapshot is published (default 50ms). Under a
	// steady stream of changes a snapshot still goes out every 20 Debounce. Either way the
	// next snapshot is not built before bridge.Paced(the cost of the last) has passed.
	Debounce time.Duration
	Logger   *slog.Logger
}

func (c *Config) validate() error {
	if len(c.Servers) == 0 {
		return errors.New("zookeeper: Servers is empty; set the ensemble's client addresses, e.g. 127.0.0.1:2181")
	}
	for _, s := range c.Servers {
		if strings.TrimSpace(s) == "" {
			return fmt.Errorf("zookeeper: empty server address in Servers %q", c.Servers)
		}
	}
	if c.DisableDubbo && c.DisableCurator {
		return errors.New("zookeeper: both layouts are disabled; nothing to watch")
	}
	if c.SessionTimeout <= 0 {
		c.SessionTimeout = 15 * time.Second
	}
	var err error
	if c.DubboRoot, err = cleanRoot("DubboRoot", c.DubboRoot, "/dubbo"); err != nil {
		return err
	}
	if c.CuratorRoot, err = cleanRoot("CuratorRoot", c.CuratorRoot, "/services"); err != nil {
		return err
	}
	if !c.DisableDubbo && !c.DisableCurator && (c.DubboRoot == c.CuratorRoot ||
		strings.HasPrefix(c.DubboRoot, c.CuratorRoot+"/") || strings.HasPrefix(c.CuratorRoot, c.DubboRoot+"/")) {
		return fmt.Errorf("zookeeper: DubboRoot %q and CuratorRoot %q overlap", c.DubboRoot, c.CuratorRoot)
	}
	if c.DubboDomain, err = cleanDomain("DubboDomain", c.DubboDomain, "dubbo"); err != nil {
		return err
	}
	if c.CuratorDomain, err = cleanDomain("CuratorDomain", c.CuratorDomain, "curator"); err != nil {
		return err
	}
	for name, p := range c.Protocols {
		if p == "" {
			return fmt.Errorf("zookeeper: Protocols[%q] is empty", name)
		}
	}
	if c.MeshedKey == "" {
		c.MeshedKey = "mesh"
	}
	if c.MaxNodeData <= 0 {
		c.MaxNodeData = 1 << 20
	}
	if c.Resync <= 0 {
		c.Resync = 60 * time.Second
	}
	if c.Debounce <= 0 {
		c.Debounce = 50 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

func cleanRoot(field, root, def string) (string, error) {
	if root == "" {
		return def, nil
	}
	if !strings.HasPrefix(root, "/") || path.Clean(root) != root || root == "/" {
		return "", fmt.Errorf("zookeeper: %s %q is not an absolute znode path below / (like %q)", field, root, def)
	}
	return root, nil
}

func cleanDomain(field, d, def string) (string, error) {
	d = strings.ToLower(strings.Trim(d, "."))
	if d == "" {
		return def, nil
	}
	if !model.ValidHostname(d) {
		return "", fmt.Errorf("zookeeper: %s %q is not a DNS-1123 domain", field, d)
	}
	return d, nil
}

// Watcher publishes the services registered in ZooKeeper. Create it with New, run it with Run.
type Watcher struct {
	cfg Config

	mu      sync.Mutex
	stats   map[string]int
	skipped []model.Skipped
	health  bridge.Health
}

var (
	_ bridge.Watcher        = (*Watcher)(nil)
	_ bridge.HealthReporter = (*Watcher)(nil)
	_ bridge.SkipReporter   = (*Watcher)(nil)
)

// New validates cfg; it does not contact ZooKeeper.
func New(cfg Config) (*Watcher, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.Servers = append([]string(nil), cfg.Servers...)
	cfg.Protocols = maps.Clone(cfg.Protocols)
	return &Watcher{cfg: cfg, stats: map[string]int{}}, nil
}

// Source names the registry.
func (w *Watcher) Source() model.Source { return model.SourceZooKeeper }

// Stats returns how many znodes the last built snapshot left out, by reason (the Reason…
// constants). It is a gauge of what is wrong in the registry now, not a running total.
func (w *Watcher) Stats() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.stats)
}

// Skipped lists the znodes the last built snapshot left out because something is wrong with
// them (not those switched off on purpose: disabled providers, consumers' URLs, meshturbo's
// own registrations), each with its path as ID and the reason.
func (w *Watcher) Skipped() []model.Skipped {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.skipped)
}

func (w *Watcher) setStats(s map[string]int, skipped []model.Skipped) {
	w.mu.Lock()
	w.stats, w.skipped = s, skipped
	w.mu.Unlock()
}

// skipCode classifies a reason for metrics; "" for entries left out on purpose.
func skipCode(reason string) model.SkipCode {
	switch reason {
	case ReasonDisabled, ReasonNotProvider, ReasonOwn:
		return ""
	case ReasonBadHost:
		return model.SkipBadAddress
	case ReasonBadPort:
		return model.SkipBadPort
	case ReasonBadName:
		return model.SkipBadHostname
	case ReasonDuplicate, ReasonOtherProtocol, ReasonHostCollision:
		return model.SkipConflict
	default: // bad encoding, URL or JSON, oversized, unreadable
		return model.SkipMalformed
	}
}

// Health reports whether the watcher has a ZooKeeper session whose last reads succeeded.
// While it is not connected, the last published snapshot stays in force.
func (w *Watcher) Health() bridge.Health {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.health
}

// contact records a successful exchange with ZooKeeper.
func (w *Watcher) contact() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.health.Connected, w.health.LastContact, w.health.LastError = true, time.Now(), ""
}

// lost records that ZooKeeper does not answer, and why.
func (w *Watcher) lost(why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.health.Connected, w.health.LastError = false, why
}

// Warnings about an unreachable ensemble: the first after firstWarn without a session (at
// start), then at growing intervals up to maxWarnEvery.
const (
	firstWarn    = time.Second
	maxWarnEvery = 5 * time.Minute
)

// Run watches until ctx ends, and returns nil then. Only one Run may be active at a time.
// publish is called from Run's goroutine with the complete set of services after every
// change; never before the first complete listing, never with a partial view.
func (w *Watcher) Run(ctx context.Context, publish func([]model.Service)) error {
	r := newRun(w, publish)
	conn, events, err := r.connect(ctx)
	if err != nil {
		return nil // ctx ended
	}
	r.conn = conn

	// Close the client when ctx ends, even in the middle of a request, and wait for all of its
	// goroutines: the event channel is closed once they have finished.
	stopped := make(chan struct{})
	var closer sync.WaitGroup
	closer.Add(1)
	go func() {
		defer closer.Done()
		select {
		case <-ctx.Done():
		case <-stopped:
		}
		conn.Close()
	}()
	defer func() {
		close(stopped)
		closer.Wait()
		for range events {
		}
		w.lost("watcher stopped")
	}()
	return r.loop(ctx)
}

// connect creates the client, retrying while it cannot (no server address resolves). The
// client then connects and reconnects by itself.
func (r *run) connect(ctx context.Context) (*zk.Conn, <-chan zk.Event, error) {
	bo := newBackoff()
	for {
		conn, events, err := zk.Connect(r.cfg.Servers, r.cfg.SessionTimeout,
			zk.WithLogger(r.zlog), zk.WithEventCallback(r.onEvent))
		if err == nil {
			return conn, events, nil
		}
		r.w.lost(fmt.Sprintf("set up the zookeeper client: %v", err))
		r.log.Warn("cannot set up the zookeeper client; retrying", "servers", r.servers(), "error", err,
			"retry_in", bo.peek(), "fix", "make the addresses in Config.Servers resolvable host:port pairs")
		if !bo.wait(ctx) {
			return nil, nil, ctx.Err()
		}
	}
}

// run is the state of one Run. The fields below the queue are owned by Run's goroutine.
type run struct {
	w       *Watcher
	cfg     *Config
	log     *slog.Logger
	zlog    *zkLogger
	publish func([]model.Service)
	conn    *zk.Conn

	qmu   sync.Mutex
	queue []zk.Event
	kick  chan struct{}

	connected     bool
	everConnected bool
	downSince     time.Time
	sessionID     int64
	warnTimer     *time.Timer
	warnEvery     time.Duration

	needFull bool // a complete re-listing is due
	synced   bool // a complete listing has succeeded
	armed    map[watchKey]bool
	dirty    map[string]bool // znode paths to read again

	dubbo   map[string]map[string]node // interface directory → provider node name → node
	curator map[string]map[string]node // service name → instance ID → node

	published bool
	notBefore time.Time // no snapshot is built before: the rest after the last (bridge.Paced)
	last      []model.Service
	logged    map[skipped]bool // skips already logged, so each is logged once
}

func newRun(w *Watcher, publish func([]model.Service)) *run {
	return &run{
		w:         w,
		cfg:       &w.cfg,
		log:       w.cfg.Logger,
		zlog:      &zkLogger{log: w.cfg.Logger},
		publish:   publish,
		kick:      make(chan struct{}, 1),
		downSince: time.Now(),
		warnEvery: firstWarn,
		needFull:  true,
		armed:     map[watchKey]bool{},
		dirty:     map[string]bool{},
		dubbo:     map[string]map[string]node{},
		curator:   map[string]map[string]node{},
		logged:    map[skipped]bool{},
	}
}

func (r *run) servers() string { return strings.Join(r.cfg.Servers, ",") }

// onEvent receives every event of the client, on the client's goroutine: it must not block.
func (r *run) onEvent(ev zk.Event) {
	r.qmu.Lock()
	r.queue = append(r.queue, ev)
	r.qmu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *run) loop(ctx context.Context) error {
	resync := time.NewTicker(r.cfg.Resync)
	defer resync.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	r.warnTimer = time.NewTimer(r.warnEvery)
	defer r.warnTimer.Stop()

	bo := newBackoff()
	backingOff := false
	var pendingSince time.Time // when the first unpublished change was made
	for {
		if r.connected && !backingOff && (r.needFull || len(r.dirty) > 0) {
			if err := r.work(); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				level := slog.LevelWarn
				if !r.connected || isConnErr(err) {
					level = slog.LevelDebug // the connection warning says it all
				}
				r.log.Log(ctx, level, "zookeeper read failed; keeping the last snapshot", "servers", r.servers(),
					"error", err, "retry_in", bo.peek())
				r.w.lost(err.Error())
				backingOff = true
				retry.Reset(bo.next())
			} else {
				r.w.contact()
				bo.reset()
				now := time.Now()
				if pendingSince.IsZero() {
					pendingSince = now
				}
				debounce.Reset(max(min(r.cfg.Debounce, max(pendingSince.Add(20*r.cfg.Debounce).Sub(now), 0)), time.Until(r.notBefore)))
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-r.kick:
			r.handleEvents()
		case <-retry.C:
			backingOff = false
		case <-resync.C:
			r.needFull = true
		case <-r.warnTimer.C:
			if !r.connected {
				r.warnUnreachable()
			}
		case <-debounce.C:
			pendingSince = time.Time{}
			built := time.Now()
			r.maybePublish()
			r.notBefore = time.Now().Add(bridge.Paced(time.Since(built)))
		}
	}
}

// warnUnreachable says the ensemble cannot be reached, what is served meanwhile and what to
// check, and schedules the next reminder.
func (r *run) warnUnreachable() {
	args := []any{"servers", r.servers(), "down_for", time.Since(r.downSince).Round(time.Millisecond)}
	if e := r.zlog.lastError(); e != "" {
		args = append(args, "last_error", e)
		r.w.lost(e)
	}
	args = append(args, "fix", "check that ZooKeeper is running and reachable at "+r.servers()+
		" (Config.Servers); the watcher keeps retrying by itself")
	if r.synced {
		r.log.Warn("zookeeper unreachable; serving the last snapshot", args...)
	} else {
		r.log.Warn("zookeeper unreachable; nothing published until it answers", args...)
	}
	r.warnEvery = min(2*r.warnEvery, maxWarnEvery)
	r.warnTimer.Reset(r.warnEvery)
}

func (r *run) handleEvents() {
	r.qmu.Lock()
	evs := r.queue
	r.queue = nil
	r.qmu.Unlock()
	for _, ev := range evs {
		switch ev.Type {
		case zk.EventSession:
			r.onSession(ev)
		case zk.EventNotWatching:
			r.disarm(ev.Path, watchChild, watchData, watchExist)
			if !errors.Is(ev.Err, zk.ErrClosing) {
				r.dirty[ev.Path] = true
			}
		case zk.EventNodeCreated:
			r.disarm(ev.Path, watchExist)
			r.dirty[ev.Path] = true
		case zk.EventNodeDataChanged:
			r.disarm(ev.Path, watchExist, watchData)
			r.dirty[ev.Path] = true
		case zk.EventNodeChildrenChanged:
			r.disarm(ev.Path, watchChild)
			r.dirty[ev.Path] = true
		case zk.EventNodeDeleted:
			r.disarm(ev.Path, watchChild, watchData, watchExist)
			r.dirty[ev.Path] = true
		}
	}
}

func (r *run) onSession(ev zk.Event) {
	switch ev.State {
	case zk.StateHasSession:
		if sid := r.conn.SessionID(); sid != r.sessionID {
			// A new session has none of the old one's watches.
			clear(r.armed)
			r.needFull = true
			r.sessionID = sid
			r.log.Info("zookeeper session established", "server", ev.Server, "session", fmt.Sprintf("0x%x", sid))
		}
		if !r.connected {
			if r.everConnected {
				r.log.Info("zookeeper reconnected; listing everything again", "server", ev.Server,
					"down_for", time.Since(r.downSince).Round(time.Millisecond))
			}
			r.connected, r.everConnected = true, true
			r.w.contact()
			r.needFull = true
			r.warnTimer.Stop()
			r.warnEvery = firstWarn
		}
	case zk.StateDisconnected:
		if r.connected {
			r.connected = false
			r.downSince = time.Now()
			r.w.lost("connection to " + ev.Server + " lost")
			r.log.Warn("zookeeper connection lost; serving the last snapshot while the client reconnects",
				"server", ev.Server, "servers", r.servers(),
				"fix", "if this lasts, check that ZooKeeper is running and reachable at "+r.servers()+" (Config.Servers)")
			r.warnEvery = 10 * time.Second
			r.warnTimer.Reset(r.warnEvery)
		}
	case zk.StateExpired:
		clear(r.armed)
		r.needFull = true
		r.sessionID = 0
		r.w.lost("session expired")
		r.log.Warn("zookeeper session expired; serving the last snapshot until a new session has listed everything again",
			"servers", r.servers(), "session_timeout", r.cfg.SessionTimeout)
	case zk.StateAuthFailed:
		r.log.Warn("zookeeper authentication failed", "server", ev.Server,
			"fix", "check the credentials the ensemble expects")
	}
}

// maybePublish builds a snapshot and publishes it if it differs from the last one.
func (r *run) maybePublish() {
	if !r.synced {
		return // a partial view is never published
	}
	var nodes []node
	for _, dir := range r.dubbo {
		for _, n := range dir {
			nodes = append(nodes, n)
		}
	}
	for _, svc := range r.curator {
		for _, n := range svc {
			nodes = append(nodes, n)
		}
	}
	snap, skips := buildSnapshot(nodes)

	stats := map[string]int{}
	var reported []model.Skipped
	logged := make(map[skipped]bool, len(skips))
	for _, s := range skips {
		stats[s.reason]++
		if code := skipCode(s.reason); code != "" {
			reported = append(reported, model.Skipped{Source: model.SourceZooKeeper, ID: s.path, Code: code, Reason: s.reason + ": " + s.detail})
		}
		logged[s] = true
		if !r.logged[s] {
			r.log.Warn("zookeeper entry skipped", "path", s.path, "reason", s.reason, "detail", s.detail)
		}
	}
	r.logged = logged
	r.w.setStats(stats, reported)

	if r.published && equalServices(r.last, snap) {
		return
	}
	r.published, r.last = true, snap
	r.log.Debug("zookeeper snapshot", "services", len(snap), "skipped", len(skips))
	r.publish(cloneServices(snap))
}

// cloneServices copies what publish receives, so the receiver may keep or change it.
func cloneServices(in []model.Service) []model.Service {
	out := make([]model.Service, len(in))
	for i, s := range in {
		s.Ports = append([]model.Port(nil), s.Ports...)
		eps := make([]model.Endpoint, len(s.Endpoints))
		for j, e := range s.Endpoints {
			e.Ports = maps.Clone(e.Ports)
			e.Labels = maps.Clone(e.Labels)
			eps[j] = e
		}
		s.Endpoints = eps
		s.Labels = maps.Clone(s.Labels)
		out[i] = s
	}
	return out
}

// zkLogger passes the client's messages to slog at debug level and remembers the last
// connection failure for the unreachable warning.
type zkLogger struct {
	log *slog.Logger

	mu      sync.Mutex
	lastErr string
}

func (l *zkLogger) Printf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if strings.HasPrefix(msg, "failed to connect") {
		l.mu.Lock()
		l.lastErr = msg
		l.mu.Unlock()
	}
	l.log.Debug("zookeeper client", "event", msg)
}

func (l *zkLogger) lastError() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastErr
}

// backoff doubles from 100ms to 5s.
type backoff struct{ d time.Duration }

func newBackoff() *backoff             { return &backoff{d: 100 * time.Millisecond} }
func (b *backoff) reset()              { b.d = 100 * time.Millisecond }
func (b *backoff) peek() time.Duration { return b.d }

// next returns the current delay and doubles the following one.
func (b *backoff) next() time.Duration {
	d := b.d
	b.d = min(2*b.d, 5*time.Second)
	return d
}

// wait sleeps for the next delay; false if ctx ended first.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
