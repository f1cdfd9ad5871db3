package lazyload

import (
	"cmp"
	"slices"
	"sync"
	"time"
)

// Origin says where an edge comes from.
type Origin string

const (
	// OriginLearned edges were seen in the fallback's access logs and expire when unused.
	OriginLearned Origin = "learned"
	// OriginStatic edges are declared in config and never expire.
	OriginStatic Origin = "static"
)

// maxStretch caps how far hysteresis stretches an edge's TTL: an edge that keeps coming back
// right after it expired lives up to maxStretch×TTL between uses.
const maxStretch = 8

// EdgeKey is one dependency: workload → host:port.
type EdgeKey struct {
	Workload string `json:"workload"` // "<namespace>/<name>"
	Host     string `json:"host"`
	Port     uint32 `json:"port"`
}

// Edge is what is known about one dependency.
type Edge struct {
	EdgeKey
	Protocol  string    `json:"protocol,omitempty"`
	Origin    Origin    `json:"origin"`
	FirstSeen time.Time `json:"firstSeen"`
	LastSeen  time.Time `json:"lastSeen"`
	Hits      uint64    `json:"hits"`
	// Stretch multiplies the TTL: 1 normally, doubled each time the edge is learned again
	// soon after it expired (hysteresis against flapping), at most maxStretch.
	Stretch int `json:"stretch"`
	// Published is when the edge first reached the workload's served scope (zero: not yet).
	Published time.Time `json:"published,omitzero"`
	// LastFallbackHit is the last time the call went through the fallback: once the edge
	// is published and the workload's Envoy has the direct route, it stops moving.
	LastFallbackHit time.Time `json:"lastFallbackHit,omitzero"`
}

// expires returns when a learned edge lapses.
func (e *Edge) expires(ttl time.Duration) time.Time {
	return e.LastSeen.Add(ttl * time.Duration(max(e.Stretch, 1)))
}

// tombstone remembers an expired edge for one TTL so that an edge coming back soon after
// expiring gets a longer life next time.
type tombstone struct {
	Key     EdgeKey   `json:"key"`
	Expired time.Time `json:"expired"`
	Stretch int       `json:"stretch"`
}

// Graph holds the learned and static edges. It is safe for concurrent use.
//
// Hysteresis: an edge joins the scope at its first use (the direct path must come quickly)
// but leaves only after TTL×stretch without use, and only in a sweep; an edge that is learned
// again within one TTL of expiring doubles its stretch, so an intermittent caller settles
// into keeping the edge instead of flapping it in and out of the scope.
type Graph struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	edges   map[EdgeKey]*Edge
	tombs   map[EdgeKey]tombstone
	version uint64 // bumped on any change to the edge set (not on hit counts)
	dirty   bool   // something to persist
}

// NewGraph returns an empty graph whose learned edges expire after ttl without use.
func NewGraph(ttl time.Duration, now func() time.Time) *Graph {
	if now == nil {
		now = time.Now
	}
	return &Graph{ttl: ttl, now: now, edges: map[EdgeKey]*Edge{}, tombs: map[EdgeKey]tombstone{}}
}

// Observe records one call of key through the fallback. It reports whether the edge is new
// (the workload's scope must grow).
func (g *Graph) Observe(key EdgeKey, protocol string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	if e, ok := g.edges[key]; ok {
		e.Hits++
		e.LastSeen = now
		e.LastFallbackHit = now
		if e.Protocol == "" {
			e.Protocol = protocol
		}
		g.dirty = true
		return false
	}
	stretch := 1
	if t, ok := g.tombs[key]; ok {
		if now.Sub(t.Expired) < g.ttl {
			stretch = min(max(t.Stretch, 1)*2, maxStretch)
		}
		delete(g.tombs, key)
	}
	g.edges[key] = &Edge{EdgeKey: key, Protocol: protocol, Origin: OriginLearned, FirstSeen: now, LastSeen: now,
		LastFallbackHit: now, Hits: 1, Stretch: stretch}
	g.version++
	g.dirty = true
	return true
}

// Learn records an edge another replica learned: new edges start as if observed now;
// known ones are refreshed (a peer saw them in use) without counting a fallback call.
func (g *Graph) Learn(key EdgeKey, protocol string) bool {
	g.mu.Lock()
	if e, ok := g.edges[key]; ok {
		if now := g.now(); now.After(e.LastSeen) {
			e.LastSeen = now
		}
		g.dirty = true
		g.mu.Unlock()
		return false
	}
	g.mu.Unlock()
	return g.Observe(key, protocol)
}

// SetStatic replaces the static edges with keys. Learned edges with the same key become static.
func (g *Graph) SetStatic(keys []EdgeKey) {
	g.mu.Lock()
	defer g.mu.Unlock()
	want := map[EdgeKey]bool{}
	for _, k := range keys {
		want[k] = true
	}
	now := g.now()
	for k, e := range g.edges {
		if e.Origin == OriginStatic && !want[k] {
			delete(g.edges, k)
			g.version++
		}
	}
	for k := range want {
		if e, ok := g.edges[k]; ok {
			if e.Origin != OriginStatic {
				e.Origin = OriginStatic
				g.version++
			}
			continue
		}
		g.edges[k] = &Edge{EdgeKey: k, Origin: OriginStatic, FirstSeen: now, LastSeen: now, Stretch: 1}
		g.version++
	}
	g.dirty = true
}

// Sweep removes learned edges unused for their TTL and reports how many went.
func (g *Graph) Sweep() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	n := 0
	for k, e := range g.edges {
		if e.Origin == OriginLearned && !now.Before(e.expires(g.ttl)) {
			g.tombs[k] = tombstone{Key: k, Expired: now, Stretch: e.Stretch}
			delete(g.edges, k)
			n++
		}
	}
	for k, t := range g.tombs {
		if now.Sub(t.Expired) >= g.ttl {
			delete(g.tombs, k)
		}
	}
	if n > 0 {
		g.version++
		g.dirty = true
	}
	return n
}

// MarkPublished records that the edges of workload reached its served scope.
func (g *Graph) MarkPublished(workload string, at time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for k, e := range g.edges {
		if k.Workload == workload && e.Published.IsZero() {
			e.Published = at
			g.dirty = true
		}
	}
}

// Version changes whenever the edge set does.
func (g *Graph) Version() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.version
}

// Edges returns copies of the edges, sorted by workload, host and port; workload "" means all.
func (g *Graph) Edges(workload string) []Edge {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]Edge, 0, len(g.edges))
	for k, e := range g.edges {
		if workload == "" || k.Workload == workload {
			out = append(out, *e)
		}
	}
	slices.SortFunc(out, func(a, b Edge) int {
		return cmp.Or(cmp.Compare(a.Workload, b.Workload), cmp.Compare(a.Host, b.Host), cmp.Compare(a.Port, b.Port))
	})
	return out
}

// Expires returns when e lapses; zero for static edges.
func (g *Graph) Expires(e *Edge) time.Time {
	if e.Origin == OriginStatic {
		return time.Time{}
	}
	return e.expires(g.ttl)
}

// state is the graph's persisted form.
type state struct {
	Version    int         `json:"version"`
	Edges      []Edge      `json:"edges"`
	Tombstones []tombstone `json:"tombstones,omitempty"`
}

const stateVersion = 1

// snapshot returns the persisted form and clears the dirty flag; ok is false when nothing
// changed since the last snapshot.
func (g *Graph) snapshot(force bool) (state, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.dirty && !force {
		return state{}, false
	}
	g.dirty = false
	st := state{Version: stateVersion}
	for _, e := range g.edges {
		if e.Origin == OriginLearned {
			st.Edges = append(st.Edges, *e)
		}
	}
	for _, t := range g.tombs {
		st.Tombstones = append(st.Tombstones, t)
	}
	slices.SortFunc(st.Edges, func(a, b Edge) int {
		return cmp.Or(cmp.Compare(a.Workload, b.Workload), cmp.Compare(a.Host, b.Host), cmp.Compare(a.Port, b.Port))
	})
	slices.SortFunc(st.Tombstones, func(a, b tombstone) int {
		return cmp.Or(cmp.Compare(a.Key.Workload, b.Key.Workload), cmp.Compare(a.Key.Host, b.Key.Host), cmp.Compare(a.Key.Port, b.Key.Port))
	})
	return st, true
}

// restore loads learned edges from a persisted state. Static edges come from config.
func (g *Graph) restore(st state) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, e := range st.Edges {
		e := e
		e.Origin = OriginLearned
		if _, ok := g.edges[e.EdgeKey]; !ok {
			g.edges[e.EdgeKey] = &e
		}
	}
	for _, t := range st.Tombstones {
		g.tombs[t.Key] = t
	}
	g.version++
}
