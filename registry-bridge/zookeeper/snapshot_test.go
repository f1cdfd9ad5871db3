package zookeeper

import (
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/meshturbo/meshturbo/model"
)

// dubboNodes parses provider URLs as the watcher does, all under one interface directory. Each
// URL is percent-encoded into a znode name, as Dubbo does, unless it starts with "raw:".
func dubboNodes(t *testing.T, iface string, urls ...string) []node {
	t.Helper()
	w, err := New(Config{Servers: []string{"127.0.0.1:2181"}})
	if err != nil {
		t.Fatal(err)
	}
	r := newRun(w, nil)
	var out []node
	for _, u := range urls {
		name, raw := strings.CutPrefix(u, "raw:")
		if !raw {
			name = url.QueryEscape(u)
		}
		out = append(out, r.dubboNode("/dubbo/"+iface+"/providers/"+name, iface, name))
	}
	return out
}

func endpoints(s model.Service) []string {
	var out []string
	for _, e := range s.Endpoints {
		out = append(out, fmt.Sprintf("%s %s:%v w%d", e.ID, e.Address, e.Ports, e.Weight))
	}
	return out
}

func reasons(skips []skipped) map[string]int {
	out := map[string]int{}
	for _, s := range skips {
		out[s.reason]++
	}
	return out
}

func TestBuildSnapshotDubbo(t *testing.T) {
	const svc = "com.example.Greeter"
	nodes := dubboNodes(t, svc,
		"dubbo://10.0.0.1:20880/com.example.Greeter?weight=50&application=greeter",
		"dubbo://10.0.0.2:20880/com.example.Greeter",
		"dubbo://10.0.0.3:20881/com.example.Greeter",
		// the same address registered again later (a restart whose old session has not expired):
		"dubbo://10.0.0.2:20880/com.example.Greeter?timestamp=200&weight=300",
		"dubbo://10.0.0.2:20880/com.example.Greeter?timestamp=100&weight=7",
		// another version is another service
		"tri://10.0.0.4:50051/com.example.Greeter?version=2.0.0",
		// left out
		"dubbo://10.0.0.5:20880/com.example.Greeter?enabled=false",
		"dubbo://10.0.0.6:20880/com.example.Greeter?side=consumer",
		"dubbo://greeter.example.com:20880/com.example.Greeter",
		"dubbo://10.0.0.7:0/com.example.Greeter",
	)
	nodes = append(nodes, dubboNodes(t, svc, "raw:dubbo%3A%2F%2F%ZZ")...)

	snap, skips := buildSnapshot(nodes)
	if len(snap) != 2 {
		t.Fatalf("services = %+v, want 2", snap)
	}
	v1, v2 := snap[0], snap[1]
	if v1.Hostname != "com.example.greeter.dubbo" || v2.Hostname != "com.example.greeter.v2-0-0.dubbo" {
		t.Fatalf("host names = %q, %q", v1.Hostname, v2.Hostname)
	}
	if want := []model.Port{{Name: "tcp", Number: 20880, Protocol: model.ProtocolTCP}}; !slices.Equal(v1.Ports, want) {
		t.Errorf("v1 ports = %+v, want %+v", v1.Ports, want)
	}
	wantEPs := []string{"10.0.0.1:20880 10.0.0.1:map[tcp:20880] w50", "10.0.0.2:20880 10.0.0.2:map[tcp:20880] w300", "10.0.0.3:20881 10.0.0.3:map[tcp:20881] w100"}
	if got := endpoints(v1); !slices.Equal(got, wantEPs) {
		t.Errorf("v1 endpoints = %q\nwant %q", got, wantEPs)
	}
	if v1.Endpoints[0].Labels["application"] != "greeter" || v1.Source != model.SourceZooKeeper {
		t.Errorf("v1 labels %v source %q", v1.Endpoints[0].Labels, v1.Source)
	}
	if want := []model.Port{{Name: "grpc", Number: 50051, Protocol: model.ProtocolGRPC}}; !slices.Equal(v2.Ports, want) {
		t.Errorf("v2 ports = %+v, want %+v", v2.Ports, want)
	}
	want := map[string]int{ReasonDuplicate: 2, ReasonDisabled: 1, ReasonNotProvider: 1, ReasonBadHost: 1, ReasonBadPort: 1, ReasonBadEncoding: 1}
	if got := reasons(skips); !maps.Equal(got, want) {
		t.Errorf("skip reasons = %v, want %v (%+v)", got, want, skips)
	}
	if out, sk := model.Sanitize(snap); len(sk) != 0 || len(out) != 2 {
		t.Errorf("the snapshot does not pass model.Sanitize: %v", sk)
	}

	// Determinism: any order of nodes gives the same snapshot.
	slices.Reverse(nodes)
	again, skips2 := buildSnapshot(nodes)
	if !equalServices(snap, again) || !slices.Equal(skips, skips2) {
		t.Error("a different node order gives a different snapshot")
	}
}

func TestBuildSnapshotProtocolAndPortChoice(t *testing.T) {
	tests := []struct {
		name      string
		urls      []string
		wantProto model.Protocol
		wantPort  uint32
		wantSkip  int
	}{
		{name: "majority protocol wins", urls: []string{"tri://10.0.0.1:50051/S", "tri://10.0.0.2:50051/S", "dubbo://10.0.0.3:20880/S"},
			wantProto: model.ProtocolGRPC, wantPort: 50051, wantSkip: 1},
		{name: "protocol tie goes to GRPC", urls: []string{"dubbo://10.0.0.1:20880/S", "tri://10.0.0.1:50051/S"},
			wantProto: model.ProtocolGRPC, wantPort: 50051, wantSkip: 1},
		{name: "port tie goes to the lowest", urls: []string{"dubbo://10.0.0.1:20881/S", "dubbo://10.0.0.2:20880/S"},
			wantProto: model.ProtocolTCP, wantPort: 20880},
		{name: "most common port", urls: []string{"rest://10.0.0.1:9000/S", "rest://10.0.0.2:8080/S", "rest://10.0.0.3:9000/S"},
			wantProto: model.ProtocolHTTP, wantPort: 9000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap, skips := buildSnapshot(dubboNodes(t, "S", tc.urls...))
			if len(snap) != 1 {
				t.Fatalf("services = %+v", snap)
			}
			if p := snap[0].Ports[0]; p.Protocol != tc.wantProto || p.Number != tc.wantPort {
				t.Errorf("port = %+v, want %s %d", p, tc.wantProto, tc.wantPort)
			}
			if len(skips) != tc.wantSkip {
				t.Errorf("skipped = %+v, want %d", skips, tc.wantSkip)
			}
		})
	}
}

func TestBuildSnapshotHostCollision(t *testing.T) {
	// Interface "a.b" without group and interface "a" in group "b" both make "a.b.dubbo".
	nodes := append(dubboNodes(t, "a.b", "dubbo://10.0.0.1:20880/a.b"), dubboNodes(t, "a", "dubbo://10.0.0.2:20880/a?group=b")...)
	for range 2 {
		snap, skips := buildSnapshot(nodes)
		if len(snap) != 1 || snap[0].Endpoints[0].Address != "10.0.0.1" {
			t.Fatalf("services = %+v, want a.b's only", snap)
		}
		if len(skips) != 1 || skips[0].reason != ReasonHostCollision {
			t.Fatalf("skipped = %+v, want one host collision", skips)
		}
		slices.Reverse(nodes)
	}
}

func TestCuratorNode(t *testing.T) {
	w, err := New(Config{Servers: []string{"127.0.0.1:2181"}, MaxNodeData: 200})
	if err != nil {
		t.Fatal(err)
	}
	r := newRun(w, nil)
	mk := func(id, data string) node { return r.curatorNode("/services/orders/"+id, "orders", id, []byte(data)) }
	nodes := []node{
		mk("a", `{"address":"10.0.0.1","port":8080,"payload":{"metadata":{"zone":"z1","mesh":"true"}}}`),
		mk("b", `{"address":"10.0.0.2","port":8080,"payload":{"metadata":{"protocol":"grpc"}}}`),
		mk("c", `{"address":"10.0.0.3","port":8081}`),
		mk("d", `{"address":"10.0.0.4","port":8080,"payload":{"metadata":{"instance_status":"OUT_OF_SERVICE"}}}`),
		mk("e", `{"address":"10.0.0.5","port":8080,"padding":"`+fmt.Sprint(make([]byte, 200))+`"}`),
		mk("f", `not json`),
	}
	snap, skips := buildSnapshot(nodes)
	if len(snap) != 1 || snap[0].Hostname != "orders.curator" {
		t.Fatalf("services = %+v", snap)
	}
	s := snap[0]
	if want := []model.Port{{Name: "http", Number: 8080, Protocol: model.ProtocolHTTP}}; !slices.Equal(s.Ports, want) {
		t.Errorf("ports = %+v, want %+v", s.Ports, want)
	}
	if len(s.Endpoints) != 2 || s.Endpoints[0].ID != "a" || !s.Endpoints[0].Meshed || s.Endpoints[0].Labels["zone"] != "z1" ||
		s.Endpoints[1].ID != "c" || s.Endpoints[1].Ports["http"] != 8081 {
		t.Errorf("endpoints = %+v", s.Endpoints)
	}
	want := map[string]int{ReasonOtherProtocol: 1, ReasonDisabled: 1, ReasonOversized: 1, ReasonBadJSON: 1}
	if got := reasons(skips); !maps.Equal(got, want) {
		t.Errorf("skip reasons = %v, want %v", got, want)
	}
}

func TestConfigValidate(t *testing.T) {
	bad := []Config{
		{},
		{Servers: []string{""}},
		{Servers: []string{"x"}, DisableDubbo: true, DisableCurator: true},
		{Servers: []string{"x"}, DubboRoot: "dubbo"},
		{Servers: []string{"x"}, DubboRoot: "/dubbo/"},
		{Servers: []string{"x"}, CuratorRoot: "/"},
		{Servers: []string{"x"}, DubboRoot: "/reg", CuratorRoot: "/reg/services"},
		{Servers: []string{"x"}, DubboDomain: "Not_A_Domain"},
		{Servers: []string{"x"}, Protocols: map[string]model.Protocol{"dubbo": ""}},
	}
	for _, c := range bad {
		if _, err := New(c); err == nil {
			t.Errorf("New(%+v) succeeded, want an error", c)
		}
	}
	w, err := New(Config{Servers: []string{"x"}, DubboDomain: ".Mesh.Local."})
	if err != nil {
		t.Fatal(err)
	}
	if c := w.cfg; c.DubboRoot != "/dubbo" || c.CuratorRoot != "/services" || c.DubboDomain != "mesh.local" ||
		c.CuratorDomain != "curator" || c.Resync <= 0 || c.Debounce <= 0 || c.MaxNodeData != 1<<20 {
		t.Errorf("defaults = %+v", c)
	}
}
