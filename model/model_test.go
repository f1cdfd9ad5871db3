package model

import (
	"slices"
	"strings"
	"testing"
)

func httpService(host string, eps ...Endpoint) Service {
	return Service{
		Hostname:  host,
		Source:    SourceConsul,
		Ports:     []Port{{Name: "http", Number: 80, Protocol: ProtocolHTTP}},
		Endpoints: eps,
	}
}

func ep(id, addr string, port uint32) Endpoint {
	return Endpoint{ID: id, Address: addr, Ports: map[string]uint32{"http": port}}
}

func TestSanitize(t *testing.T) {
	tests := []struct {
		name        string
		in          Service
		wantKept    bool
		wantEPs     []string
		wantReasons []string
	}{
		{
			name:     "valid service and endpoints are kept",
			in:       httpService("a.service.consul", ep("a1", "10.0.0.1", 8080), ep("a2", "fd00::1", 8080)),
			wantKept: true, wantEPs: []string{"a1", "a2"},
		},
		{
			name:     "endpoint with a host name instead of an IP is skipped",
			in:       httpService("a.service.consul", ep("a1", "10.0.0.1", 8080), ep("bad", "db.example.com", 8080)),
			wantKept: true, wantEPs: []string{"a1"}, wantReasons: []string{`address "db.example.com" is not an IP address`},
		},
		{
			name:     "endpoint port 0 is skipped",
			in:       httpService("a.service.consul", ep("zero", "10.0.0.2", 0)),
			wantKept: true, wantEPs: nil, wantReasons: []string{`port "http" number 0 is outside 1-65535`},
		},
		{
			name:     "endpoint port above 65535 is skipped",
			in:       httpService("a.service.consul", ep("big", "10.0.0.2", 70000)),
			wantKept: true, wantReasons: []string{"number 70000 is outside"},
		},
		{
			name:        "service port 0 drops the service",
			in:          Service{Hostname: "b.service.consul", Ports: []Port{{Name: "http", Number: 0}}},
			wantReasons: []string{"number 0 is outside 1-65535"},
		},
		{
			name:        "upper-case host name drops the service",
			in:          httpService("Bad_Name.service.consul"),
			wantReasons: []string{"is not a DNS-1123 name"},
		},
		{
			name:        "service without ports is dropped",
			in:          Service{Hostname: "c.service.consul"},
			wantReasons: []string{"no port"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, skipped := Sanitize([]Service{tc.in})
			if got := len(out) == 1; got != tc.wantKept {
				t.Fatalf("kept = %v, want %v (skipped %v)", got, tc.wantKept, skipped)
			}
			if tc.wantKept {
				var ids []string
				for _, e := range out[0].Endpoints {
					ids = append(ids, e.ID)
				}
				if !slices.Equal(ids, tc.wantEPs) {
					t.Errorf("endpoints = %v, want %v", ids, tc.wantEPs)
				}
			}
			if len(skipped) != len(tc.wantReasons) {
				t.Fatalf("skipped = %v, want reasons %q", skipped, tc.wantReasons)
			}
			for i, r := range tc.wantReasons {
				if skipped[i].Code == "" {
					t.Errorf("skip %q has no code", skipped[i].Reason)
				}
				if !strings.Contains(skipped[i].Reason, r) {
					t.Errorf("reason %q does not contain %q", skipped[i].Reason, r)
				}
			}
		})
	}
}

func TestSanitizeDoesNotAlterInput(t *testing.T) {
	in := []Service{httpService("a.service.consul", ep("bad", "x", 1), ep("ok", "10.0.0.1", 1))}
	Sanitize(in)
	if in[0].Endpoints[0].ID != "bad" || len(in[0].Endpoints) != 2 {
		t.Fatalf("input changed: %+v", in[0].Endpoints)
	}
}

func TestCatalogIsDeterministicAndDetectsChanges(t *testing.T) {
	a := httpService("a.service.consul", ep("a2", "10.0.0.2", 80), ep("a1", "10.0.0.1", 80))
	b := httpService("b.service.consul", ep("b1", "10.0.0.3", 80))
	c1 := NewCatalog([]Service{b, a})
	c2 := NewCatalog([]Service{a, b})
	if got := c2.Changed(c1); len(got) != 0 {
		t.Fatalf("same input in another order changed %v", got)
	}
	if c1.Services[0].Hostname != "a.service.consul" || c1.Services[0].Endpoints[0].ID != "a1" {
		t.Fatalf("catalog not sorted: %+v", c1.Services)
	}

	a2 := httpService("a.service.consul", ep("a1", "10.0.0.1", 80))
	c3 := NewCatalog([]Service{a2, b})
	if got := c3.Changed(c1); !slices.Equal(got, []string{"a.service.consul"}) {
		t.Fatalf("changed = %v, want only a", got)
	}
	c4 := NewCatalog([]Service{b})
	if got := c4.Changed(c1); !slices.Equal(got, []string{"a.service.consul"}) {
		t.Fatalf("removal: changed = %v, want a", got)
	}
	if got := c1.Changed(nil); len(got) != 2 {
		t.Fatalf("from nothing: changed = %v, want both", got)
	}
}

func TestCatalogConflictKeepsFirst(t *testing.T) {
	first := httpService("x.example", ep("c", "10.0.0.1", 80))
	second := httpService("x.example", ep("z", "10.0.0.2", 80))
	second.Source = SourceEureka
	c := NewCatalog([]Service{first, second})
	if len(c.Services) != 1 || c.Services[0].Source != SourceConsul {
		t.Fatalf("winner = %+v, want consul's", c.Services)
	}
	if len(c.Skipped) != 1 || c.Skipped[0].Source != SourceEureka {
		t.Fatalf("skipped = %+v, want eureka's", c.Skipped)
	}
	if c.Lookup("x.example") == nil || c.Lookup("y.example") != nil {
		t.Fatal("Lookup gives wrong answers")
	}
}

func TestParseProtocol(t *testing.T) {
	for in, want := range map[string]Protocol{"http": ProtocolHTTP, "HTTP": ProtocolHTTP, "grpc": ProtocolGRPC,
		"h2c": ProtocolHTTP2, "": ProtocolTCP, "dubbo": ProtocolTCP, "tcp": ProtocolTCP} {
		if got := ParseProtocol(in); got != want {
			t.Errorf("ParseProtocol(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestCatalogUnionMergesEndpoints(t *testing.T) {
	first := httpService("x.example", ep("c", "10.0.0.1", 80))
	second := httpService("x.example", ep("z", "10.0.0.2", 81))
	second.Source = SourceEureka
	tcpOnly := Endpoint{ID: "t", Address: "10.0.0.3", Ports: map[string]uint32{"tcp": 9}}
	second.Endpoints = append(second.Endpoints, tcpOnly)
	c := NewCatalogMerged([]Service{first, second}, MergeUnion)
	s := c.Lookup("x.example")
	if s == nil || len(s.Endpoints) != 2 || s.Source != SourceConsul {
		t.Fatalf("union = %+v, want consul's service with both http endpoints", s)
	}
	if len(c.Skipped) != 1 || c.Skipped[0].ID != "t" {
		t.Fatalf("skipped = %+v, want the endpoint on an undeclared port", c.Skipped)
	}
	if len(first.Endpoints) != 1 {
		t.Fatal("union changed its input")
	}
}
