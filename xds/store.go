package xds

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	mcp "istio.io/api/mcp/v1alpha1"
)

// Resource is one Istio config object served over MCP-over-xDS.
type Resource struct {
	// Namespace and Name form the MCP name "namespace/name" istiod requires.
	Namespace string
	Name      string
	Labels    map[string]string
	// Spec is the Istio API message, e.g. *networking.ServiceEntry.
	Spec proto.Message
}

// Store holds the state of the world per type URL and answers xDS watches from it.
// It implements go-control-plane's cache.Cache for the state-of-the-world protocol.
// Every type URL a client asks for is answered, with an empty list when the store holds
// nothing for it: istiod waits for every type it watches before it serves.
//
// Versions are content hashes: a resource's version changes only when its content does,
// and a type's response version changes only when one of its resources does, so two stores
// fed the same input serve identical versions and an unchanged Set causes no push.
type Store struct {
	mu      sync.Mutex
	types   map[string]*typeState
	watches map[string]map[*watch]struct{}
}

type typeState struct {
	version   string
	resources []*anypb.Any
	names     map[string]string // MCP name → resource version
}

type watch struct {
	req  *discovery.DiscoveryRequest
	out  chan cache.Response
	done chan struct{}
	once sync.Once
}

func (w *watch) cancel() { w.once.Do(func() { close(w.done) }) }

var _ cache.Cache = (*Store)(nil)

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{types: map[string]*typeState{}, watches: map[string]map[*watch]struct{}{}}
}

// Set replaces the full state of typeURL with res and notifies clients when it changed.
// It returns whether anything changed. Two resources with the same name are an error and
// leave the previous state in place.
func (s *Store) Set(typeURL string, res []Resource) (bool, error) {
	st, err := buildTypeState(res)
	if err != nil {
		return false, fmt.Errorf("set %s: %w", typeURL, err)
	}
	return s.install(typeURL, st), nil
}

// SetEnvoy replaces the full state of an Envoy resource type (e.g. resource.ClusterType) with
// res, keyed by resource name, for an Envoy this server drives directly (the lazy-load
// fallback). It returns whether anything changed.
func (s *Store) SetEnvoy(typeURL string, res map[string]proto.Message) (bool, error) {
	st, err := buildEnvoyState(res)
	if err != nil {
		return false, fmt.Errorf("set %s: %w", typeURL, err)
	}
	return s.install(typeURL, st), nil
}

// install makes st the state of typeURL and answers the waiting watches, unless nothing changed.
func (s *Store) install(typeURL string, st *typeState) bool {
	s.mu.Lock()
	if old, ok := s.types[typeURL]; ok && old.version == st.version {
		s.mu.Unlock()
		return false
	}
	s.types[typeURL] = st
	var fire []*watch
	for w := range s.watches[typeURL] {
		fire = append(fire, w)
	}
	delete(s.watches, typeURL)
	s.mu.Unlock()
	for _, w := range fire {
		s.respond(w, typeURL, st)
	}
	return true
}

// Version returns the current response version of typeURL ("" when never set).
func (s *Store) Version(typeURL string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.types[typeURL]; ok {
		return st.version
	}
	return ""
}

// ResourceVersions returns MCP name → version for typeURL.
func (s *Store) ResourceVersions(typeURL string) map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]string{}
	if st, ok := s.types[typeURL]; ok {
		for k, v := range st.names {
			out[k] = v
		}
	}
	return out
}

// emptyState answers types nothing was set for. Building it from no resources cannot fail.
var emptyState, _ = buildTypeState(nil)

func buildTypeState(res []Resource) (*typeState, error) {
	entries := make([]stateEntry, 0, len(res))
	for _, r := range res {
		if r.Namespace == "" || r.Name == "" || strings.Contains(r.Name, "/") {
			return nil, fmt.Errorf("resource %q/%q: namespace and name must be set and name must not contain '/'", r.Namespace, r.Name)
		}
		name := r.Namespace + "/" + r.Name
		version, err := contentVersion(r.Spec, r.Labels)
		if err != nil {
			return nil, fmt.Errorf("resource %s: %w", name, err)
		}
		body, err := anypb.New(r.Spec)
		if err != nil {
			return nil, fmt.Errorf("resource %s: %w", name, err)
		}
		wrapped, err := anypb.New(&mcp.Resource{
			Metadata: &mcp.Metadata{Name: name, Version: version, Labels: r.Labels},
			Body:     body,
		})
		if err != nil {
			return nil, fmt.Errorf("resource %s: %w", name, err)
		}
		entries = append(entries, stateEntry{name: name, version: version, body: wrapped})
	}
	return newTypeState(entries)
}

// buildEnvoyState builds the state of an Envoy type (Cluster, Listener, Secret, …): the
// resources are sent as they are, named by their own name.
func buildEnvoyState(res map[string]proto.Message) (*typeState, error) {
	entries := make([]stateEntry, 0, len(res))
	for name, m := range res {
		version, err := contentVersion(m, nil)
		if err != nil {
			return nil, fmt.Errorf("resource %s: %w", name, err)
		}
		body, err := anypb.New(m)
		if err != nil {
			return nil, fmt.Errorf("resource %s: %w", name, err)
		}
		entries = append(entries, stateEntry{name: name, version: version, body: body})
	}
	return newTypeState(entries)
}

type stateEntry struct {
	name, version string
	body          *anypb.Any
}

// contentVersion hashes a resource's content. Deterministic marshalling makes the hash a
// function of content alone.
func contentVersion(m proto.Message, labels map[string]string) (string, error) {
	spec, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	h.Write(spec)
	for _, k := range sortedKeys(labels) {
		fmt.Fprintf(h, "\x00%s=%s", k, labels[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// newTypeState sorts entries by name and derives the type version from names and versions.
func newTypeState(entries []stateEntry) (*typeState, error) {
	slices.SortFunc(entries, func(a, b stateEntry) int { return cmp.Compare(a.name, b.name) })
	st := &typeState{names: make(map[string]string, len(entries)), resources: make([]*anypb.Any, 0, len(entries))}
	typeHash := sha256.New()
	for _, e := range entries {
		if _, dup := st.names[e.name]; dup {
			return nil, fmt.Errorf("resource %s appears twice", e.name)
		}
		st.names[e.name] = e.version
		st.resources = append(st.resources, e.body)
		fmt.Fprintf(typeHash, "%s\x00%s\x00", e.name, e.version)
	}
	st.version = hex.EncodeToString(typeHash.Sum(nil))[:16]
	return st, nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// CreateWatch answers at once when the client's version differs from the current one, and
// otherwise holds the watch until the type changes. A NACK (a request carrying an error) is
// not answered with the same version again: the client already has it and rejected it.
func (s *Store) CreateWatch(req *cache.Request, _ cache.Subscription, out chan cache.Response) (func(), error) {
	typeURL := req.GetTypeUrl()
	w := &watch{req: req, out: out, done: make(chan struct{})}
	s.mu.Lock()
	st, ok := s.types[typeURL]
	if !ok {
		st = emptyState
	}
	if req.GetVersionInfo() != st.version && req.GetErrorDetail() == nil {
		s.mu.Unlock()
		s.respond(w, typeURL, st)
		return w.cancel, nil
	}
	if s.watches[typeURL] == nil {
		s.watches[typeURL] = map[*watch]struct{}{}
	}
	s.watches[typeURL][w] = struct{}{}
	s.mu.Unlock()
	return func() {
		w.cancel()
		s.mu.Lock()
		delete(s.watches[typeURL], w)
		s.mu.Unlock()
	}, nil
}

// respond hands the response to the stream. The stream's channel may be full while its
// goroutine is busy; the send gives up when the watch is cancelled, so nothing blocks forever.
func (s *Store) respond(w *watch, typeURL string, st *typeState) {
	resp := &cache.PassthroughResponse{
		Request: w.req,
		DiscoveryResponse: &discovery.DiscoveryResponse{
			VersionInfo: st.version,
			TypeUrl:     typeURL,
			Resources:   st.resources,
		},
		ReturnedResources: st.names,
	}
	select {
	case w.out <- resp:
		return
	default:
	}
	go func() {
		select {
		case w.out <- resp:
		case <-w.done:
		}
	}()
}

var errDeltaUnsupported = errors.New("incremental (delta) xDS is not served; use state-of-the-world ADS")

// CreateDeltaWatch refuses incremental xDS: istiod's MCP client speaks state of the world.
func (s *Store) CreateDeltaWatch(*cache.DeltaRequest, cache.Subscription, chan cache.DeltaResponse) (func(), error) {
	return nil, errDeltaUnsupported
}

// Fetch answers REST-style polling with the current state.
func (s *Store) Fetch(_ context.Context, req *cache.Request) (cache.Response, error) {
	s.mu.Lock()
	st, ok := s.types[req.GetTypeUrl()]
	s.mu.Unlock()
	if !ok {
		st = emptyState
	}
	return &cache.PassthroughResponse{
		Request: req,
		DiscoveryResponse: &discovery.DiscoveryResponse{
			VersionInfo: st.version, TypeUrl: req.GetTypeUrl(), Resources: st.resources,
		},
		ReturnedResources: st.names,
	}, nil
}
