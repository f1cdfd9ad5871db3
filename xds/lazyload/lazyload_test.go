package lazyload

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	accesslogdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	networking "istio.io/api/networking/v1alpha3"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
	"github.com/meshturbo/meshturbo/xds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is a settable clock for TTL tests.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestEdgeExpiresAfterTTLAndComesBackWithLongerLife(t *testing.T) {
	clk := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	g := NewGraph(time.Hour, clk.now)
	k := EdgeKey{Workload: "default/client", Host: "a.consul", Port: 80}
	if !g.Observe(k, "HTTP") {
		t.Fatal("first observation is not reported as a new edge")
	}
	if g.Observe(k, "HTTP") {
		t.Fatal("second observation is reported as a new edge")
	}
	clk.add(59 * time.Minute)
	if g.Sweep() != 0 {
		t.Fatal("edge expired before its TTL")
	}
	g.Observe(k, "HTTP") // used again: its TTL restarts
	clk.add(59 * time.Minute)
	if g.Sweep() != 0 {
		t.Fatal("a used edge expired: TTL must count from the last use")
	}
	clk.add(2 * time.Minute)
	if g.Sweep() != 1 || len(g.Edges("")) != 0 {
		t.Fatal("edge unused for its TTL was kept")
	}
	// Learned again soon after expiring: hysteresis doubles its life.
	clk.add(10 * time.Minute)
	g.Observe(k, "HTTP")
	clk.add(90 * time.Minute)
	if g.Sweep() != 0 {
		t.Fatal("an edge that came back right after expiring did not get a longer life")
	}
	clk.add(31 * time.Minute)
	if g.Sweep() != 1 {
		t.Fatal("stretched edge not expired after 2×TTL")
	}
	// The stretch is capped.
	for range 10 {
		g.Observe(k, "HTTP")
		clk.add(time.Duration(maxStretch)*time.Hour + time.Minute)
		if g.Sweep() != 1 {
			t.Fatal("edge outlived maxStretch×TTL")
		}
	}
}

func TestStaticEdgesNeverExpire(t *testing.T) {
	clk := &clock{t: time.Now()}
	g := NewGraph(time.Minute, clk.now)
	k := EdgeKey{Workload: "default/client", Host: "b.consul"}
	g.SetStatic([]EdgeKey{k})
	clk.add(24 * time.Hour)
	g.Sweep()
	if e := g.Edges(""); len(e) != 1 || e[0].Origin != OriginStatic {
		t.Fatalf("static edge changed: %+v", e)
	}
	v := g.Version()
	g.SetStatic([]EdgeKey{k})
	if g.Version() != v {
		t.Fatal("setting the same static edges changed the version (would push)")
	}
	g.SetStatic(nil)
	if len(g.Edges("")) != 0 {
		t.Fatal("removed static edge kept")
	}
}

func TestStateFileRoundTripAndCorruption(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "edges.json")
	clk := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	g := NewGraph(time.Hour, clk.now)
	g.Observe(EdgeKey{Workload: "default/client", Host: "a.consul", Port: 80}, "HTTP")
	g.Observe(EdgeKey{Workload: "default/client", Host: "t.consul", Port: 9000}, "TCP")
	g.SetStatic([]EdgeKey{{Workload: "default/client", Host: "s.consul"}})
	st, ok := g.snapshot(false)
	if !ok {
		t.Fatal("nothing to persist after changes")
	}
	if err := saveState(path, st); err != nil {
		t.Fatal(err)
	}
	if _, ok := g.snapshot(false); ok {
		t.Fatal("unchanged graph asks to be persisted again")
	}
	loaded, err := loadState(path)
	if err != nil {
		t.Fatal(err)
	}
	g2 := NewGraph(time.Hour, clk.now)
	g2.restore(loaded)
	got := g2.Edges("")
	if len(got) != 2 || got[0].Host != "a.consul" || got[1].Host != "t.consul" || got[1].Protocol != "TCP" || got[0].Hits != 1 {
		t.Fatalf("restored edges %+v; want the two learned ones (static edges come from config)", got)
	}
	if _, err := loadState(filepath.Join(t.TempDir(), "missing.json")); err != nil {
		t.Fatalf("a missing state file must be an empty state: %v", err)
	}
	if err := os.WriteFile(path, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadState(path); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "move it away") {
		t.Fatalf("corrupt state file error %v must name the file and the fix", err)
	}
}

func catalog() *model.Catalog {
	ep := func(addr string) []model.Endpoint { return []model.Endpoint{{ID: addr, Address: addr}} }
	return model.NewCatalog([]model.Service{
		{Hostname: "a.consul", Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}}, Endpoints: ep("10.0.0.1")},
		{Hostname: "b.consul", Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}}, Endpoints: ep("10.0.0.2")},
		{Hostname: "g.consul", Ports: []model.Port{{Name: "grpc", Number: 9090, Protocol: model.ProtocolGRPC}}, Endpoints: ep("10.0.0.3")},
		{Hostname: "t.consul", Ports: []model.Port{{Name: "tcp", Number: 9000, Protocol: model.ProtocolTCP}}, Endpoints: ep("10.0.0.4")},
		{Hostname: "u.consul", Ports: []model.Port{{Name: "tcp", Number: 9100, Protocol: model.ProtocolTCP}}, Endpoints: ep("10.0.0.5")},
		{Hostname: "v.consul", Ports: []model.Port{{Name: "tcp", Number: 9100, Protocol: model.ProtocolTCP}}, Endpoints: ep("10.0.0.6")},
	})
}

func TestScopeHoldsCalledHostsAndStandInsForUncoveredPorts(t *testing.T) {
	fb := Fallback{Address: "10.9.9.9"}
	w := &Workload{Namespace: "default", Name: "client"}
	edges := []Edge{{EdgeKey: EdgeKey{Workload: w.ID(), Host: "a.consul", Port: 80}}, {EdgeKey: EdgeKey{Workload: w.ID(), Host: "t.consul", Port: 9000}}}
	hosts, n := scopeHosts(w, edges, indexCatalog(catalog()), fb, []string{"istio-system/*"})
	want := []string{
		"*/a.consul",
		"*/meshturbo-fallback.meshturbo.internal",
		"*/port-9090.meshturbo-fallback.meshturbo.internal",
		"*/port-9100.meshturbo-fallback.meshturbo.internal",
		"*/t.consul",
		"istio-system/*",
	}
	if !slices.Equal(hosts, want) || n != 2 {
		t.Fatalf("scope %v (%d services), want %v (2)", hosts, n, want)
	}
	sc := sidecar(w, hosts, fb).Spec.(*networking.Sidecar)
	if p := sc.GetOutboundTrafficPolicy(); p.GetMode() != networking.OutboundTrafficPolicy_ALLOW_ANY ||
		p.GetEgressProxy().GetHost() != "meshturbo-fallback.meshturbo.internal" || p.GetEgressProxy().GetPort().GetNumber() != 15081 {
		t.Fatalf("unknown traffic must go to the fallback as Istio's egress proxy: %v", p)
	}
}

func TestFallbackConfig(t *testing.T) {
	fb := Fallback{Address: "10.9.9.9"}
	ses := FallbackServiceEntries(catalog(), fb, "cluster.local")
	byHost := map[string]*networking.ServiceEntry{}
	for _, r := range ses {
		byHost[r.Name] = r.Spec.(*networking.ServiceEntry)
	}
	if len(byHost) != 5 { // the fallback + ports 80, 9000, 9090, 9100
		t.Fatalf("fallback ServiceEntries %v", byHost)
	}
	for host, se := range byHost {
		ep := se.GetEndpoints()[0]
		if ep.GetLabels()[tlsModeLabel] != "istio" || se.GetSubjectAltNames()[0] != "spiffe://cluster.local/ns/meshturbo-system/sa/meshturbo-fallback" {
			t.Fatalf("%s: the fallback must be reached over Istio mTLS with its identity checked: %v", host, se)
		}
	}
	if p := byHost["port-9000.meshturbo-fallback.meshturbo.internal"].GetEndpoints()[0].GetPorts(); p["tcp-9000"] != 9000 {
		t.Fatalf("a TCP stand-in must lead to the fallback's listener on the same port: %v", p)
	}
	if p := byHost["port-80.meshturbo-fallback.meshturbo.internal"].GetEndpoints()[0].GetPorts(); p["http-80"] != 15081 {
		t.Fatalf("an HTTP stand-in must lead to the fallback's HTTP port: %v", p)
	}

	fr, err := fallbackResources(catalog(), fb, &Identity{CertChain: []byte("c"), Key: []byte("k"), Roots: []byte("r")})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := fr.Listeners["fallback_tcp_9000"]; !ok {
		t.Fatalf("no fallback listener for the TCP port one service owns: %v", keys(fr.Listeners))
	}
	if _, ok := fr.Listeners["fallback_tcp_9100"]; ok || !strings.Contains(fr.Unroutable[9100], "u.consul, v.consul") {
		t.Fatalf("a TCP port shared by two services must be reported, not guessed: %v", fr.Unroutable)
	}
	for name := range fr.Clusters {
		if h, p, ok := parseClusterName(name); !ok || clusterName(h, p) != name {
			t.Fatalf("cluster name %q does not parse back", name)
		}
	}
	if len(fr.Clusters) != 6 {
		t.Fatalf("want a cluster per service port, have %v", keys(fr.Clusters))
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func TestParseDependency(t *testing.T) {
	for in, ok := range map[string]bool{"a.consul": true, "a.consul:80": true, "a.consul:0": false, ":80": false, "a b": false, "a.consul:x": false} {
		if _, _, err := parseDependency(in); (err == nil) != ok {
			t.Errorf("parseDependency(%q) error %v, want ok=%v", in, err, ok)
		}
	}
}

// alsEntry is one fallback access-log entry: caller SPIFFE id → upstream cluster.
func alsEntry(spiffe, cluster string) *accesslogdata.HTTPAccessLogEntry {
	return &accesslogdata.HTTPAccessLogEntry{CommonProperties: &accesslogdata.AccessLogCommon{
		UpstreamCluster: cluster,
		AccessLogType:   accesslogdata.AccessLogType_DownstreamStart,
		TlsProperties: &accesslogdata.TLSProperties{PeerCertificateProperties: &accesslogdata.TLSProperties_CertificateProperties{
			SubjectAltName: []*accesslogdata.TLSProperties_CertificateProperties_SubjectAltName{{San: &accesslogdata.TLSProperties_CertificateProperties_SubjectAltName_Uri{Uri: spiffe}}},
		}},
	}}
}

// TestControllerLearnsOverALSAndKeepsEdgesAcrossRestart streams access logs over real gRPC
// into the controller, and checks the served Sidecar, the persisted edges, and that a change in
// a service the workload does not call leaves its Sidecar untouched.
func TestControllerLearnsOverALSAndKeepsEdgesAcrossRestart(t *testing.T) {
	store := xds.NewStore()
	state := filepath.Join(t.TempDir(), "edges.json")
	cfg := Config{
		Store: store, Fallback: Fallback{Address: "10.9.9.9"}, StateFile: state, PersistInterval: 10 * time.Millisecond,
		Identity:  Identity{CertChain: []byte("c"), Key: []byte("k"), Roots: []byte("r")},
		Workloads: []Workload{{Namespace: "default", Name: "client", Selector: map[string]string{"app": "client"}, Dependencies: []string{"g.consul"}}},
		Logger:    testenv.Logger(t),
	}
	ctrl, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctrl.SetCatalog(catalog())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	ctrl.RegisterALS(gs)
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(lis) }()
	defer func() { gs.Stop(); <-served }()

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	err = stream.Send(&alsv3.StreamAccessLogsMessage{LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{
		LogEntry: []*accesslogdata.HTTPAccessLogEntry{
			alsEntry("spiffe://cluster.local/ns/default/sa/client", "lazy|80|a.consul"),
			alsEntry("spiffe://cluster.local/ns/other/sa/stranger", "lazy|80|b.consul"),      // not a lazy-load workload
			alsEntry("spiffe://cluster.local/ns/default/sa/client", "outbound|80||b.consul"), // not a fallback cluster
		},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	awaitScope(t, ctrl, func(s Scope) bool {
		return slices.Contains(s.Hosts, "*/a.consul") && slices.Contains(s.Hosts, "*/g.consul")
	})
	s, _ := ctrl.Scope("default/client")
	if slices.Contains(s.Hosts, "*/b.consul") || s.FallbackHits != 1 || s.Services != 2 {
		t.Fatalf("scope %+v: want a.consul (learned) and g.consul (declared) only, 1 fallback hit", s)
	}
	if st := ctrl.Stats(); st.UnknownCalls != 1 {
		t.Fatalf("unknown caller calls %d, want 1", st.UnknownCalls)
	}
	sidecarVersion := store.Version(xds.TypeSidecar)
	bCluster := store.ResourceVersions(typeCluster)["lazy|80|b.consul"]

	// An unrelated service gains an endpoint: the workload's Sidecar must not change.
	cat := catalog()
	for i := range cat.Services {
		if cat.Services[i].Hostname == "b.consul" {
			cat.Services[i].Endpoints = append(cat.Services[i].Endpoints, model.Endpoint{ID: "x", Address: "10.0.0.99"})
		}
	}
	ctrl.SetCatalog(cat)
	// The fallback follows the catalog (b.consul's cluster changes); the scope does not.
	awaitCondition(t, func() bool { return store.ResourceVersions(typeCluster)["lazy|80|b.consul"] != bCluster })
	if v := store.Version(xds.TypeSidecar); v != sidecarVersion {
		t.Fatal("a change in a service the workload never calls changed its Sidecar (a push to it)")
	}

	if err := ctrl.Close(); err != nil {
		t.Fatal(err)
	}
	ctrl2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl2.Close()
	ctrl2.SetCatalog(cat)
	awaitScope(t, ctrl2, func(s Scope) bool { return slices.Contains(s.Hosts, "*/a.consul") })
	if store.Version(xds.TypeSidecar) != sidecarVersion {
		t.Fatal("after a restart the same edges must give the same Sidecar version")
	}
}

func awaitCondition(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func awaitScope(t *testing.T, c *Controller, ok func(Scope) bool) {
	t.Helper()
	awaitCondition(t, func() bool {
		s, found := c.Scope("default/client")
		return found && ok(s)
	})
}

// replica is one controller with its own store and gRPC server, as one meshturbo-xds is.
type replica struct {
	store *xds.Store
	ctrl  *Controller
	addr  string
	stop  func()
}

func startReplica(t *testing.T, lis net.Listener, peers ...string) *replica {
	t.Helper()
	r := &replica{store: xds.NewStore(), addr: lis.Addr().String()}
	ctrl, err := New(Config{
		Store: r.store, Fallback: Fallback{Address: "10.9.9.9"}, Peers: peers,
		Identity:  Identity{CertChain: []byte("c"), Key: []byte("k"), Roots: []byte("r")},
		Workloads: []Workload{{Namespace: "default", Name: "client", Selector: map[string]string{"app": "client"}}},
		Logger:    testenv.Logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	r.ctrl = ctrl
	ctrl.SetCatalog(catalog())
	gs := grpc.NewServer()
	ctrl.RegisterALS(gs)
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(lis) }()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			gs.Stop()
			<-served
			if err := ctrl.Close(); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(r.stop)
	return r
}

func sendALS(t *testing.T, addr string, entries ...*accesslogdata.HTTPAccessLogEntry) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&alsv3.StreamAccessLogsMessage{LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{
		HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: entries}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
}

// TestReplicasShareLearnedEdges: an edge learned by one replica reaches the other, both serve
// the same Sidecar version, and a restarted replica catches up from its peer.
func TestReplicasShareLearnedEdges(t *testing.T) {
	la, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addrB := lb.Addr().String()
	a := startReplica(t, la, addrB)
	b := startReplica(t, lb, la.Addr().String())

	sendALS(t, a.addr, alsEntry("spiffe://cluster.local/ns/default/sa/client", "lazy|80|a.consul"))
	awaitScope(t, b.ctrl, func(s Scope) bool { return slices.Contains(s.Hosts, "*/a.consul") })
	awaitCondition(t, func() bool { return a.store.Version(xds.TypeSidecar) == b.store.Version(xds.TypeSidecar) })
	if s, _ := b.ctrl.Scope("default/client"); s.FallbackHits != 0 {
		t.Fatalf("an edge from a peer counted as a fallback call on the replica that did not see it: %+v", s)
	}

	// B restarts with nothing (no state file): A sends it everything on reconnection.
	b.stop()
	lb2, err := net.Listen("tcp", addrB)
	if err != nil {
		t.Fatal(err)
	}
	b2 := startReplica(t, lb2, la.Addr().String())
	awaitScope(t, b2.ctrl, func(s Scope) bool { return slices.Contains(s.Hosts, "*/a.consul") })
	awaitCondition(t, func() bool { return a.store.Version(xds.TypeSidecar) == b2.store.Version(xds.TypeSidecar) })

	// And an edge B learns now reaches A.
	sendALS(t, b2.addr, alsEntry("spiffe://cluster.local/ns/default/sa/client", "lazy|9000|t.consul"))
	awaitScope(t, a.ctrl, func(s Scope) bool { return slices.Contains(s.Hosts, "*/t.consul") })
}

// BenchmarkScopes computes every workload's scope once, as publish does on each change: 1,000
// workloads calling 5 services each, in a catalog of 10,000 services on 10 ports.
func BenchmarkScopes(b *testing.B) {
	const services, workloads, calls, ports = 10000, 1000, 5, 10
	svcs := make([]model.Service, services)
	for i := range svcs {
		p := uint32(8000 + i%ports)
		svcs[i] = model.Service{Hostname: fmt.Sprintf("svc-%05d.consul", i),
			Ports:     []model.Port{{Name: "http", Number: p, Protocol: model.ProtocolHTTP}},
			Endpoints: []model.Endpoint{{ID: "e", Address: "10.0.0.1"}}}
	}
	cat := model.NewCatalog(svcs)
	ws := make([]Workload, workloads)
	edges := make([][]Edge, workloads)
	for i := range ws {
		ws[i] = Workload{Namespace: "default", Name: fmt.Sprintf("w%d", i)}
		for j := range calls {
			edges[i] = append(edges[i], Edge{EdgeKey: EdgeKey{Workload: ws[i].ID(), Host: svcs[(i*7+j*131)%services].Hostname, Port: 8000}})
		}
	}
	fb := Fallback{Address: "10.9.9.9"}
	b.ResetTimer()
	for b.Loop() {
		idx := indexCatalog(cat)
		for i := range ws {
			if _, n := scopeHosts(&ws[i], edges[i], idx, fb, nil); n != calls {
				b.Fatalf("workload %d: %d services in scope, want %d", i, n, calls)
			}
		}
	}
}
