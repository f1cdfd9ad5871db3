package lazyload

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	accesslogdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"google.golang.org/grpc"

	"github.com/meshturbo/meshturbo/model"
	"github.com/meshturbo/meshturbo/xds"
)

// Config configures a Controller.
type Config struct {
	// Store receives the Sidecar resources (for istiod) and the fallback's Envoy resources.
	Store *xds.Store
	// Fallback is the fallback proxy. Its Address is required.
	Fallback Fallback
	// Identity is the fallback's mesh certificate, issued for Fallback.ServiceAccount.
	Identity Identity
	// TrustDomain of the mesh's SPIFFE ids (default cluster.local).
	TrustDomain string
	// Workloads are the workloads narrowed to what they call.
	Workloads []Workload
	// AlwaysInclude are Sidecar egress hosts every scope keeps ("istio-system/*", "./*", …).
	AlwaysInclude []string
	// EdgeTTL: a learned edge unused this long leaves the scope (default 24h).
	EdgeTTL time.Duration
	// StateFile keeps the learned edges across restarts; empty keeps them in memory only.
	StateFile string
	// Peers are the gRPC (xDS) addresses of the other meshturbo-xds replicas; learned edges are
	// shared with them so every replica serves the same Sidecars.
	Peers []string
	// PersistInterval bounds how often the state file is written (default 1s).
	PersistInterval time.Duration
	Logger          *slog.Logger
	// Now is the clock (default time.Now); tests inject one.
	Now func() time.Time
}

func (c *Config) validate() error {
	if c.Store == nil {
		return errors.New("lazyload: Config.Store is nil")
	}
	c.Fallback.defaults()
	if ip, err := netip.ParseAddr(c.Fallback.Address); err != nil || !ip.IsValid() {
		return fmt.Errorf("lazyload: fallback address %q is not an IP address; set lazyload.fallback.address to the IP the fallback Envoy listens on", c.Fallback.Address)
	}
	if len(c.Identity.CertChain) == 0 || len(c.Identity.Key) == 0 || len(c.Identity.Roots) == 0 {
		return errors.New("lazyload: the fallback has no mesh certificate; set lazyload.caDir to the mesh CA (ca-cert.pem, ca-key.pem)")
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	seen := map[string]bool{}
	for i := range c.Workloads {
		w := &c.Workloads[i]
		if w.Namespace == "" || w.Name == "" {
			return fmt.Errorf("lazyload: workload %d: namespace and name are required", i)
		}
		if len(w.Selector) == 0 {
			return fmt.Errorf("lazyload: workload %s: selector is empty; a Sidecar without a selector would narrow every proxy of the namespace", w.ID())
		}
		if w.ServiceAccount == "" {
			w.ServiceAccount = w.Name
		}
		if seen[w.Namespace+"/sa/"+w.ServiceAccount] {
			return fmt.Errorf("lazyload: workload %s: another workload of namespace %s has service account %q; the fallback tells callers apart by it", w.ID(), w.Namespace, w.ServiceAccount)
		}
		seen[w.Namespace+"/sa/"+w.ServiceAccount] = true
		for _, d := range w.Dependencies {
			if _, _, err := parseDependency(d); err != nil {
				return fmt.Errorf("lazyload: workload %s: %w", w.ID(), err)
			}
		}
	}
	if c.EdgeTTL <= 0 {
		c.EdgeTTL = 24 * time.Hour
	}
	if c.PersistInterval <= 0 {
		c.PersistInterval = time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// parseDependency reads "host" or "host:port".
func parseDependency(d string) (string, uint32, error) {
	host, port, err := net.SplitHostPort(d)
	if err != nil {
		if strings.Contains(d, ":") || !model.ValidHostname(d) {
			return "", 0, fmt.Errorf("dependency %q: want host or host:port", d)
		}
		return d, 0, nil
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || !model.ValidHostname(host) {
		return "", 0, fmt.Errorf("dependency %q: want host or host:port", d)
	}
	return host, uint32(n), nil
}

// Controller learns edges from the fallback's access logs and serves each workload's scope.
type Controller struct {
	cfg   Config
	log   *slog.Logger
	graph *Graph
	bySA  map[string]*Workload // "<ns>/<sa>" → workload
	byID  map[string]*Workload // "<ns>/<name>" → workload

	wake chan struct{}
	stop chan struct{}
	done chan struct{}

	mu          sync.Mutex
	catalog     *model.Catalog
	scopes      map[string]Scope // by workload id
	hits        map[string]uint64
	unknown     uint64 // access-log entries from callers that are no configured workload
	unroutable  map[uint32]string
	published   map[string]time.Time // workload → last Sidecar change served
	persistErr  error
	identityGen int
	peers       []*peer
}

// New validates cfg, restores the persisted edges and starts the controller. Register the
// access-log service on the xDS server's gRPC server with RegisterALS.
func New(cfg Config) (*Controller, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	c := &Controller{
		cfg: cfg, log: cfg.Logger, graph: NewGraph(cfg.EdgeTTL, cfg.Now), bySA: map[string]*Workload{},
		byID: map[string]*Workload{},
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
		scopes: map[string]Scope{}, hits: map[string]uint64{}, published: map[string]time.Time{},
	}
	for i := range c.cfg.Workloads {
		w := &c.cfg.Workloads[i]
		c.bySA[w.Namespace+"/"+w.ServiceAccount] = w
		c.byID[w.ID()] = w
	}
	if cfg.StateFile != "" {
		st, err := loadState(cfg.StateFile)
		if err != nil {
			return nil, err
		}
		c.graph.restore(st)
		c.log.Info("lazy-load edges restored", "file", cfg.StateFile, "edges", len(st.Edges))
	}
	var static []EdgeKey
	for i := range c.cfg.Workloads {
		w := &c.cfg.Workloads[i]
		for _, d := range w.Dependencies {
			host, port, _ := parseDependency(d) // validated
			static = append(static, EdgeKey{Workload: w.ID(), Host: host, Port: port})
		}
	}
	c.graph.SetStatic(static)
	for _, addr := range cfg.Peers {
		c.peers = append(c.peers, newPeer(addr, c))
	}
	go c.run()
	return c, nil
}

// RegisterALS adds the access-log service to s (meshturbo-xds's gRPC server).
func (c *Controller) RegisterALS(s *grpc.Server) {
	alsv3.RegisterAccessLogServiceServer(s, &alsServer{c: c})
}

// SetCatalog gives the controller the bridged catalog; scopes and the fallback follow it.
func (c *Controller) SetCatalog(cat *model.Catalog) {
	c.mu.Lock()
	c.catalog = cat
	c.mu.Unlock()
	c.poke()
}

// ServiceEntries returns the fallback's ServiceEntries for cat, to serve with the bridged ones.
func (c *Controller) ServiceEntries(cat *model.Catalog) []xds.Resource {
	return FallbackServiceEntries(cat, c.cfg.Fallback, c.cfg.TrustDomain)
}

// SetIdentity replaces the fallback's certificate (renewal).
func (c *Controller) SetIdentity(id Identity) {
	c.mu.Lock()
	c.cfg.Identity = id
	c.identityGen++
	c.mu.Unlock()
	c.poke()
}

func (c *Controller) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// observe handles one access-log entry of the fallback, or an edge a peer replica learned.
func (c *Controller) observe(p *accesslogdata.AccessLogCommon, protocol string, fromPeer bool) {
	host, port, ok := parseClusterName(p.GetUpstreamCluster())
	if !ok {
		return // an unknown host (404 at the fallback): nothing to learn
	}
	ns, sa, ok := peerIdentity(p, c.cfg.TrustDomain)
	var w *Workload
	if ok {
		w = c.bySA[ns+"/"+sa]
	}
	if w == nil {
		c.mu.Lock()
		c.unknown++
		first := c.unknown == 1
		c.mu.Unlock()
		if first {
			c.log.Warn("fallback call from a caller that is no configured lazy-load workload; add it to lazyload.workloads to narrow its scope",
				"namespace", ns, "serviceAccount", sa, "host", host, "port", port)
		}
		return
	}
	key := EdgeKey{Workload: w.ID(), Host: host, Port: port}
	if fromPeer {
		if c.graph.Learn(key, protocol) {
			c.log.Info("lazy-load edge learned from a peer replica", "workload", w.ID(), "host", host, "port", port)
			c.poke()
		}
		return
	}
	switch p.GetAccessLogType() {
	case accesslogdata.AccessLogType_DownstreamStart, accesslogdata.AccessLogType_TcpUpstreamConnected, accesslogdata.AccessLogType_NotSet:
		c.mu.Lock()
		c.hits[w.ID()]++
		c.mu.Unlock()
	}
	if c.graph.Observe(key, protocol) {
		c.log.Info("lazy-load edge learned", "workload", w.ID(), "host", host, "port", port, "protocol", protocol)
		c.poke()
		for _, p := range c.peers {
			p.send(key)
		}
	}
}

func (c *Controller) run() {
	defer close(c.done)
	sweep := time.NewTicker(min(max(c.cfg.EdgeTTL/10, time.Second), time.Minute))
	defer sweep.Stop()
	persist := time.NewTicker(c.cfg.PersistInterval)
	defer persist.Stop()
	var lastVersion uint64 = 1<<64 - 1
	var lastCatalog, fallbackCatalog *model.Catalog
	lastIdentity, fallbackIdentity := -1, -1
	for {
		select {
		case <-c.stop:
			c.persist(true)
			return
		case <-c.wake:
		case <-sweep.C:
			if n := c.graph.Sweep(); n > 0 {
				c.log.Info("lazy-load edges expired", "count", n)
			}
		case <-persist.C:
			c.persist(false)
			continue
		}
		c.mu.Lock()
		cat, id, idGen := c.catalog, c.cfg.Identity, c.identityGen
		c.mu.Unlock()
		if cat == nil {
			continue
		}
		// The fallback follows the catalog and its certificate only: a new edge does not
		// rebuild it. It goes first: a scope must never drop a host before the fallback can
		// serve it.
		if cat != fallbackCatalog || idGen != fallbackIdentity {
			if err := c.publishFallback(cat, &id); err != nil {
				c.log.Error("lazy-load fallback config not served; the previous one stays in force", "error", err)
				continue
			}
			fallbackCatalog, fallbackIdentity = cat, idGen
		}
		if v := c.graph.Version(); v != lastVersion || cat != lastCatalog || idGen != lastIdentity {
			if err := c.publish(cat); err != nil {
				c.log.Error("lazy-load scopes not served; the previous ones stay in force", "error", err)
				continue
			}
			lastVersion, lastCatalog, lastIdentity = v, cat, idGen
		}
	}
}

// publishFallback serves the fallback Envoy's config for cat.
func (c *Controller) publishFallback(cat *model.Catalog, id *Identity) error {
	fr, err := fallbackResources(cat, c.cfg.Fallback, id)
	if err != nil {
		return err
	}
	if _, err := c.cfg.Store.SetEnvoy(typeSecret, fr.Secrets); err != nil {
		return err
	}
	if _, err := c.cfg.Store.SetEnvoy(typeCluster, fr.Clusters); err != nil {
		return err
	}
	if _, err := c.cfg.Store.SetEnvoy(typeListener, fr.Listeners); err != nil {
		return err
	}
	c.mu.Lock()
	c.unroutable = fr.Unroutable
	c.mu.Unlock()
	return nil
}

// publish computes every workload's scope and serves the Sidecars.
func (c *Controller) publish(cat *model.Catalog) error {
	scopes := map[string]Scope{}
	res := make([]xds.Resource, 0, len(c.cfg.Workloads))
	idx := indexCatalog(cat)
	for i := range c.cfg.Workloads {
		w := &c.cfg.Workloads[i]
		hosts, services := scopeHosts(w, c.graph.Edges(w.ID()), idx, c.cfg.Fallback, c.cfg.AlwaysInclude)
		r := sidecar(w, hosts, c.cfg.Fallback)
		res = append(res, r)
		scopes[w.ID()] = Scope{Workload: w.ID(), Namespace: w.Namespace, Selector: w.Selector, Hosts: hosts, Services: services}
	}
	if _, err := c.cfg.Store.Set(xds.TypeSidecar, res); err != nil {
		return err
	}
	versions := c.cfg.Store.ResourceVersions(xds.TypeSidecar)
	now := c.cfg.Now()
	c.mu.Lock()
	for id, s := range scopes {
		w := c.workload(id)
		s.Version = versions[w.Namespace+"/"+sidecarName(w)]
		if old, ok := c.scopes[id]; !ok || old.Version != s.Version {
			c.published[id] = now
		}
		scopes[id] = s
	}
	c.scopes = scopes
	c.mu.Unlock()
	for id := range scopes {
		c.graph.MarkPublished(id, now)
	}
	return nil
}

func (c *Controller) workload(id string) *Workload { return c.byID[id] }

func (c *Controller) persist(force bool) {
	if c.cfg.StateFile == "" {
		return
	}
	st, ok := c.graph.snapshot(force)
	if !ok {
		return
	}
	err := saveState(c.cfg.StateFile, st)
	c.mu.Lock()
	prev := c.persistErr
	c.persistErr = err
	c.mu.Unlock()
	if err != nil && prev == nil {
		c.log.Error("lazy-load edges not persisted; they are kept in memory and written again on the next change", "error", err)
	}
}

// Close stops the controller and writes the edges one last time.
func (c *Controller) Close() error {
	for _, p := range c.peers {
		p.close()
	}
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.persistErr
}

// EdgeView is an edge as the admin API shows it.
type EdgeView struct {
	Edge
	Expires *time.Time `json:"expires,omitempty"`
}

// Edges returns the edges of workload ("" for all).
func (c *Controller) Edges(workload string) []EdgeView {
	edges := c.graph.Edges(workload)
	out := make([]EdgeView, 0, len(edges))
	for i := range edges {
		v := EdgeView{Edge: edges[i]}
		if exp := c.graph.Expires(&edges[i]); !exp.IsZero() {
			v.Expires = &exp
		}
		out = append(out, v)
	}
	return out
}

// Scopes returns the served scopes, sorted by workload.
func (c *Controller) Scopes() []Scope {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Scope, 0, len(c.scopes))
	for _, id := range slices.Sorted(maps.Keys(c.scopes)) {
		s := c.scopes[id]
		s.FallbackHits = c.hits[id]
		out = append(out, s)
	}
	return out
}

// Scope returns the scope of workload "<namespace>/<name>".
func (c *Controller) Scope(id string) (Scope, bool) {
	for _, s := range c.Scopes() {
		if s.Workload == id {
			return s, true
		}
	}
	return Scope{}, false
}

// Stats are the controller's counters for metrics.
type Stats struct {
	Edges        map[string]int    // per workload
	ScopeSizes   map[string]int    // bridged services per workload scope
	FallbackHits map[string]uint64 // per workload
	UnknownCalls uint64
	// DirectLag is, per edge whose calls left the fallback, the time from its first call
	// to its last call through the fallback: how long the caller waited for the direct path.
	DirectLag  []time.Duration
	Unroutable map[uint32]string
}

// Stats returns the current counters.
func (c *Controller) Stats() Stats {
	st := Stats{Edges: map[string]int{}, ScopeSizes: map[string]int{}, FallbackHits: map[string]uint64{}}
	now := c.cfg.Now()
	for _, e := range c.graph.Edges("") {
		st.Edges[e.Workload]++
		// Settled: published, and no fallback call for a while since.
		if e.Origin == OriginLearned && !e.Published.IsZero() && now.Sub(e.LastFallbackHit) > 5*time.Second {
			st.DirectLag = append(st.DirectLag, e.LastFallbackHit.Sub(e.FirstSeen))
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, s := range c.scopes {
		st.ScopeSizes[id] = s.Services
		st.FallbackHits[id] = c.hits[id]
	}
	st.UnknownCalls = c.unknown
	st.Unroutable = maps.Clone(c.unroutable)
	return st
}
