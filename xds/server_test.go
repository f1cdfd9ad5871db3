package xds

import (
	"context"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	mcp "istio.io/api/mcp/v1alpha1"
	networking "istio.io/api/networking/v1alpha3"
)

// adsClient is a minimal MCP client behaving as istiod does: one ADS stream, one request per type.
type adsClient struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	got    chan *discovery.DiscoveryResponse
}

func newADSClient(t *testing.T, addr string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &adsClient{t: t, stream: stream, got: make(chan *discovery.DiscoveryResponse, 64)}
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			r, err := stream.Recv()
			if err != nil {
				return
			}
			c.got <- r
		}
	}()
	t.Cleanup(func() { cancel(); <-recvDone; conn.Close() })
	return c
}

func (c *adsClient) send(req *discovery.DiscoveryRequest) {
	c.t.Helper()
	if req.Node == nil {
		req.Node = &core.Node{Id: "istiod-test"}
	}
	if err := c.stream.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

func (c *adsClient) recv(within time.Duration) *discovery.DiscoveryResponse {
	c.t.Helper()
	select {
	case r := <-c.got:
		return r
	case <-time.After(within):
		c.t.Fatalf("no response within %s", within)
		return nil
	}
}

func (c *adsClient) expectNothing(within time.Duration) {
	c.t.Helper()
	select {
	case r := <-c.got:
		c.t.Fatalf("unexpected push of %s version %s", r.TypeUrl, r.VersionInfo)
	case <-time.After(within):
	}
}

func (c *adsClient) ack(r *discovery.DiscoveryResponse) {
	c.send(&discovery.DiscoveryRequest{TypeUrl: r.TypeUrl, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce})
}

func startServer(t *testing.T) (*Store, *Server) {
	t.Helper()
	store := NewStore()
	srv, err := New(Config{Addr: "127.0.0.1:0", Store: store})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
	})
	return store, srv
}

func serviceEntry(host string, ip string) Resource {
	return Resource{Namespace: "meshturbo", Name: host, Spec: &networking.ServiceEntry{
		Hosts:      []string{host},
		Ports:      []*networking.ServicePort{{Number: 80, Name: "http", Protocol: "HTTP"}},
		Resolution: networking.ServiceEntry_STATIC,
		Endpoints:  []*networking.WorkloadEntry{{Address: ip}},
	}}
}

func decode(t *testing.T, r *discovery.DiscoveryResponse) map[string]*mcp.Resource {
	t.Helper()
	out := map[string]*mcp.Resource{}
	for _, a := range r.Resources {
		var m mcp.Resource
		if err := a.UnmarshalTo(&m); err != nil {
			t.Fatalf("resource is not an MCP Resource: %v", err)
		}
		out[m.Metadata.Name] = &m
	}
	return out
}

func TestEveryIstioTypeIsAnswered(t *testing.T) {
	store, srv := startServer(t)
	if _, err := store.Set(TypeServiceEntry, []Resource{serviceEntry("a.example", "10.0.0.1")}); err != nil {
		t.Fatal(err)
	}
	c := newADSClient(t, srv.Addr())
	for _, typ := range IstioTypes {
		c.send(&discovery.DiscoveryRequest{TypeUrl: typ})
	}
	seen := map[string]*discovery.DiscoveryResponse{}
	for range IstioTypes {
		r := c.recv(5 * time.Second)
		seen[r.TypeUrl] = r
	}
	for _, typ := range IstioTypes {
		if seen[typ] == nil {
			t.Errorf("type %s got no response", typ)
		}
	}
	se := decode(t, seen[TypeServiceEntry])
	res, ok := se["meshturbo/a.example"]
	if !ok || len(se) != 1 {
		t.Fatalf("ServiceEntry response = %v, want meshturbo/a.example", se)
	}
	var spec networking.ServiceEntry
	if err := res.Body.UnmarshalTo(&spec); err != nil {
		t.Fatalf("body is not a ServiceEntry: %v", err)
	}
	if spec.Hosts[0] != "a.example" || res.Metadata.Version == "" {
		t.Fatalf("decoded %v version %q", spec.Hosts, res.Metadata.Version)
	}
	if len(seen[TypeSidecar].Resources) != 0 {
		t.Fatalf("Sidecar should be empty, got %d", len(seen[TypeSidecar].Resources))
	}
}

func TestPushesOnlyOnChange(t *testing.T) {
	store, srv := startServer(t)
	a := serviceEntry("a.example", "10.0.0.1")
	b := serviceEntry("b.example", "10.0.0.2")
	if _, err := store.Set(TypeServiceEntry, []Resource{a, b}); err != nil {
		t.Fatal(err)
	}
	c := newADSClient(t, srv.Addr())
	c.send(&discovery.DiscoveryRequest{TypeUrl: TypeServiceEntry})
	first := c.recv(5 * time.Second)
	c.ack(first)
	before := decode(t, first)

	// The same content in another order is no change: no push, same versions.
	changed, err := store.Set(TypeServiceEntry, []Resource{b, a})
	if err != nil || changed {
		t.Fatalf("Set(same) changed=%v err=%v", changed, err)
	}
	c.expectNothing(300 * time.Millisecond)

	// One endpoint change: a push in which only that resource's version moved.
	b2 := serviceEntry("b.example", "10.0.0.3")
	if changed, err := store.Set(TypeServiceEntry, []Resource{a, b2}); err != nil || !changed {
		t.Fatalf("Set(changed) changed=%v err=%v", changed, err)
	}
	second := c.recv(5 * time.Second)
	after := decode(t, second)
	if second.VersionInfo == first.VersionInfo {
		t.Fatal("type version did not change")
	}
	if before["meshturbo/a.example"].Metadata.Version != after["meshturbo/a.example"].Metadata.Version {
		t.Error("unchanged resource a got a new version")
	}
	if before["meshturbo/b.example"].Metadata.Version == after["meshturbo/b.example"].Metadata.Version {
		t.Error("changed resource b kept its version")
	}

	// Removal: the next state of the world lacks the resource.
	c.ack(second)
	if _, err := store.Set(TypeServiceEntry, []Resource{a}); err != nil {
		t.Fatal(err)
	}
	if got := decode(t, c.recv(5*time.Second)); len(got) != 1 || got["meshturbo/a.example"] == nil {
		t.Fatalf("after removal got %v", got)
	}
}

func TestNackIsNotAnsweredWithTheSameVersion(t *testing.T) {
	store, srv := startServer(t)
	c := newADSClient(t, srv.Addr())
	c.send(&discovery.DiscoveryRequest{TypeUrl: TypeServiceEntry})
	first := c.recv(5 * time.Second)
	c.send(&discovery.DiscoveryRequest{TypeUrl: TypeServiceEntry, ResponseNonce: first.Nonce,
		ErrorDetail: &status.Status{Message: "bad config"}})
	c.expectNothing(300 * time.Millisecond)
	if len(srv.Clients()) != 1 || srv.Clients()[0].Nacked[TypeServiceEntry] != "bad config" {
		t.Fatalf("clients = %+v, want the NACK recorded", srv.Clients())
	}
	if _, err := store.Set(TypeServiceEntry, []Resource{serviceEntry("a.example", "10.0.0.1")}); err != nil {
		t.Fatal(err)
	}
	if r := c.recv(5 * time.Second); len(r.Resources) != 1 {
		t.Fatalf("after a new version got %d resources", len(r.Resources))
	}
}

func TestTwoStoresServeIdenticalVersions(t *testing.T) {
	s1, s2 := NewStore(), NewStore()
	in := []Resource{serviceEntry("a.example", "10.0.0.1"), serviceEntry("b.example", "10.0.0.2")}
	if _, err := s1.Set(TypeServiceEntry, in); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Set(TypeServiceEntry, []Resource{in[1], in[0]}); err != nil {
		t.Fatal(err)
	}
	if s1.Version(TypeServiceEntry) != s2.Version(TypeServiceEntry) {
		t.Fatal("two stores with the same input serve different versions")
	}
}

func TestSetRejectsBadNames(t *testing.T) {
	store := NewStore()
	good := serviceEntry("a.example", "10.0.0.1")
	if _, err := store.Set(TypeServiceEntry, []Resource{good}); err != nil {
		t.Fatal(err)
	}
	v := store.Version(TypeServiceEntry)
	for _, bad := range [][]Resource{
		{good, good},
		{{Namespace: "", Name: "x", Spec: good.Spec}},
		{{Namespace: "ns", Name: "a/b", Spec: good.Spec}},
	} {
		if _, err := store.Set(TypeServiceEntry, bad); err == nil {
			t.Errorf("Set(%v) succeeded", bad)
		}
	}
	if store.Version(TypeServiceEntry) != v {
		t.Fatal("a rejected Set changed the served state")
	}
}
