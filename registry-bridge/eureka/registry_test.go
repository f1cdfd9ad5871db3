package eureka

import (
	"maps"
	"slices"
	"testing"

	"github.com/meshturbo/meshturbo/model"
)

func inst(app, id, ip, status string, port int64, meta map[string]string) *instance {
	return &instance{App: app, ID: id, IPAddr: ip, Status: status, Metadata: meta,
		Port: portSpec{Number: port, Present: true, Enabled: true, EnabledSet: true}}
}

func regOf(insts ...*instance) *registry {
	r := &registry{apps: map[string]map[string]*instance{}}
	for _, in := range insts {
		if r.apps[in.App] == nil {
			r.apps[in.App] = map[string]*instance{}
		}
		r.apps[in.App][in.ID] = in
	}
	return r
}

func TestHashCode(t *testing.T) {
	tests := []struct {
		statuses []string
		want     string
	}{
		{nil, ""},
		{[]string{"UP", "UP", "UP"}, "UP_3_"},
		{[]string{"UP", "DOWN", "UP", "UP"}, "DOWN_1_UP_3_"},
		// Java's TreeMap order, which is byte order for these names.
		{[]string{"UP", "STARTING", "OUT_OF_SERVICE", "DOWN", "UNKNOWN", "STARTING"}, "DOWN_1_OUT_OF_SERVICE_1_STARTING_2_UNKNOWN_1_UP_1_"},
	}
	for _, tc := range tests {
		var insts []*instance
		for i, s := range tc.statuses {
			// Spread over two apps: the count is over the whole registry.
			insts = append(insts, inst([]string{"A", "B"}[i%2], string(rune('a'+i)), "10.0.0.1", s, 80, nil))
		}
		if got := regOf(insts...).hashCode(); got != tc.want {
			t.Errorf("hashCode(%v) = %q, want %q", tc.statuses, got, tc.want)
		}
	}
}

func TestApply(t *testing.T) {
	base := regOf(inst("A", "a1", "10.0.0.1", "UP", 80, nil), inst("A", "a2", "10.0.0.2", "UP", 80, nil),
		inst("B", "b1", "10.0.0.3", "UP", 80, nil))
	action := func(in *instance, a string) *instance { in.Action = a; return in }
	delta := &document{Apps: map[string]map[string]*instance{
		"A": {
			"a1": action(inst("A", "a1", "10.0.0.1", "DOWN", 80, nil), actionModified),
			"a2": action(inst("A", "a2", "10.0.0.2", "UP", 80, nil), actionDeleted),
			"a3": action(inst("A", "a3", "10.0.0.4", "UP", 80, nil), actionAdded),
			"a4": action(inst("A", "a4", "10.0.0.5", "UP", 80, nil), "SYNCED"), // unknown: ignored
		},
		"B": {"b1": action(inst("B", "b1", "10.0.0.3", "UP", 80, nil), actionDeleted)},
		"C": {"c1": action(inst("C", "c1", "10.0.0.6", "UP", 80, nil), actionAdded)},
	}}
	next := base.apply(delta)
	if got := slices.Sorted(maps.Keys(next.apps)); !slices.Equal(got, []string{"A", "C"}) {
		t.Fatalf("apps = %v, want A and C (B lost its last instance)", got)
	}
	if got := slices.Sorted(maps.Keys(next.apps["A"])); !slices.Equal(got, []string{"a1", "a3"}) {
		t.Fatalf("A = %v", got)
	}
	if next.apps["A"]["a1"].Status != statusDown {
		t.Error("a1 not modified")
	}
	if got := next.hashCode(); got != "DOWN_1_UP_2_" {
		t.Errorf("hash = %q", got)
	}
	if base.hashCode() != "UP_3_" || len(base.apps["A"]) != 2 {
		t.Error("apply changed its receiver")
	}
	if !base.changedBy(delta) {
		t.Error("changedBy: the delta changes the registry, but it says not")
	}
	// Eureka serves the same recent changes on every poll: applied again, they change nothing.
	if next.changedBy(delta) {
		t.Error("changedBy: the delta applied a second time changes nothing, but it says it does")
	}
	again := &document{Apps: map[string]map[string]*instance{
		"A": {"a1": action(inst("A", "a1", "10.0.0.1", "DOWN", 80, map[string]string{"zone": "b"}), actionModified)},
	}}
	if !next.changedBy(again) {
		t.Error("changedBy misses a metadata change")
	}
	if !next.changedBy(&document{Apps: map[string]map[string]*instance{"A": {"a3": action(inst("A", "a3", "10.0.0.4", "UP", 80, nil), actionDeleted)}}}) {
		t.Error("changedBy misses a deletion")
	}
}

func TestServices(t *testing.T) {
	secureOnly := func(in *instance, port int64) *instance {
		in.Port.Enabled = false
		in.SecurePort = portSpec{Number: port, Present: true, Enabled: true, EnabledSet: true}
		return in
	}
	m := mapping{domain: "eureka", meshedMetaKey: "mesh"}
	tests := []struct {
		name        string
		reg         *registry
		want        []model.Service
		wantSkipped map[string]int
	}{
		{
			name: "UP instances, most common port, metadata as labels",
			reg: regOf(
				inst("ORDERS", "o1", "10.0.0.1", "UP", 8080, map[string]string{"protocol": "http", "mesh": "true", "version": "v1"}),
				inst("ORDERS", "o2", "10.0.0.2", "UP", 9090, nil),
				inst("ORDERS", "o3", "10.0.0.3", "UP", 9090, map[string]string{"locality": "eu/west-1"}),
				inst("ORDERS", "o4", "10.0.0.4", "DOWN", 8080, nil),
				inst("ORDERS", "o5", "10.0.0.5", "OUT_OF_SERVICE", 8080, nil),
			),
			want: []model.Service{{
				Hostname: "orders.eureka", Source: model.SourceEureka,
				Ports: []model.Port{{Name: "http", Number: 9090, Protocol: model.ProtocolHTTP}},
				Endpoints: []model.Endpoint{
					{ID: "o1", Address: "10.0.0.1", Ports: map[string]uint32{"http": 8080}, Meshed: true,
						Labels: map[string]string{"protocol": "http", "mesh": "true", "version": "v1"}},
					{ID: "o2", Address: "10.0.0.2", Ports: map[string]uint32{"http": 9090}},
					{ID: "o3", Address: "10.0.0.3", Ports: map[string]uint32{"http": 9090}, Locality: "eu/west-1",
						Labels: map[string]string{"locality": "eu/west-1"}},
				},
			}},
		},
		{
			name: "port tie goes to the lowest; protocol from metadata",
			reg: regOf(inst("G", "g1", "10.0.0.1", "UP", 9000, map[string]string{"protocol": "grpc"}),
				inst("G", "g2", "10.0.0.2", "UP", 8000, map[string]string{"protocol": "grpc"})),
			want: []model.Service{{
				Hostname: "g.eureka", Source: model.SourceEureka,
				Ports: []model.Port{{Name: "grpc", Number: 8000, Protocol: model.ProtocolGRPC}},
				Endpoints: []model.Endpoint{
					{ID: "g1", Address: "10.0.0.1", Ports: map[string]uint32{"grpc": 9000}, Labels: map[string]string{"protocol": "grpc"}},
					{ID: "g2", Address: "10.0.0.2", Ports: map[string]uint32{"grpc": 8000}, Labels: map[string]string{"protocol": "grpc"}},
				},
			}},
		},
		{
			name: "secure port only: HTTPS, or TLS for a non-HTTP protocol",
			reg: regOf(secureOnly(inst("PAY", "p1", "10.0.0.1", "UP", 8080, nil), 8443),
				secureOnly(inst("DB", "d1", "10.0.0.2", "UP", 8080, map[string]string{"protocol": "tcp"}), 5433)),
			want: []model.Service{
				{Hostname: "db.eureka", Source: model.SourceEureka,
					Ports:     []model.Port{{Name: "tls", Number: 5433, Protocol: model.ProtocolTLS}},
					Endpoints: []model.Endpoint{{ID: "d1", Address: "10.0.0.2", Ports: map[string]uint32{"tls": 5433}, Labels: map[string]string{"protocol": "tcp"}}}},
				{Hostname: "pay.eureka", Source: model.SourceEureka,
					Ports:     []model.Port{{Name: "https", Number: 8443, Protocol: model.ProtocolHTTPS}},
					Endpoints: []model.Endpoint{{ID: "p1", Address: "10.0.0.1", Ports: map[string]uint32{"https": 8443}}}},
			},
		},
		{
			name: "non-secure port preferred when both are enabled; mixed schemes: majority wins",
			reg: regOf(
				func() *instance {
					in := inst("M", "m1", "10.0.0.1", "UP", 80, nil)
					in.SecurePort = portSpec{Number: 443, Present: true, Enabled: true, EnabledSet: true}
					return in
				}(),
				inst("M", "m2", "10.0.0.2", "UP", 80, nil),
				secureOnly(inst("M", "m3", "10.0.0.3", "UP", 80, nil), 443),
			),
			want: []model.Service{{
				Hostname: "m.eureka", Source: model.SourceEureka,
				Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}},
				Endpoints: []model.Endpoint{
					{ID: "m1", Address: "10.0.0.1", Ports: map[string]uint32{"http": 80}},
					{ID: "m2", Address: "10.0.0.2", Ports: map[string]uint32{"http": 80}},
				},
			}},
			wantSkipped: map[string]int{reasonMixedSchemes: 1},
		},
		{
			name: "malformed instances are skipped with reasons",
			reg: regOf(
				inst("A", "ok", "fd00::1", "UP", 80, nil),
				inst("A", "name", "db.example.com", "UP", 80, nil),
				inst("A", "empty", "", "UP", 80, nil),
				inst("A", "any", "0.0.0.0", "UP", 80, nil),
				inst("A", "zone", "fe80::1%eth0", "UP", 80, nil),
				inst("A", "zero", "10.0.0.2", "UP", 0, nil),
				inst("A", "big", "10.0.0.3", "UP", 70000, nil),
				inst("A", "nan", "10.0.0.4", "UP", -1, nil),
				func() *instance {
					in := inst("A", "off", "10.0.0.5", "UP", 80, nil)
					in.Port.Enabled = false
					return in
				}(),
				func() *instance { in := inst("A", "dup", "10.0.0.6", "UP", 80, nil); in.Dupes = 2; return in }(),
				inst("A", "down-bad", "nope", "DOWN", 80, nil), // not UP: not counted
			),
			want: []model.Service{{
				Hostname: "a.eureka", Source: model.SourceEureka,
				Ports: []model.Port{{Name: "http", Number: 80, Protocol: model.ProtocolHTTP}},
				Endpoints: []model.Endpoint{
					{ID: "dup", Address: "10.0.0.6", Ports: map[string]uint32{"http": 80}},
					{ID: "ok", Address: "fd00::1", Ports: map[string]uint32{"http": 80}},
				},
			}},
			wantSkipped: map[string]int{reasonBadIP: 4, reasonBadPort: 3, reasonNoPort: 1, reasonDuplicateID: 2},
		},
		{
			name: "an app with no UP instance keeps its service, without endpoints",
			reg:  regOf(inst("A", "a1", "10.0.0.1", "DOWN", 8080, nil), inst("A", "a2", "10.0.0.2", "STARTING", 8080, nil)),
			want: []model.Service{{Hostname: "a.eureka", Source: model.SourceEureka,
				Ports: []model.Port{{Name: "http", Number: 8080, Protocol: model.ProtocolHTTP}}}},
		},
		{
			name:        "app names that are no DNS names are skipped",
			reg:         regOf(inst("MY_APP", "a1", "10.0.0.1", "UP", 80, nil), inst("\u212a", "k1", "10.0.0.1", "UP", 80, nil)),
			wantSkipped: map[string]int{reasonBadHostname: 2},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, skipped := tc.reg.services(m)
			for i := range tc.want {
				tc.want[i].Normalize()
			}
			if !equalServices(got, tc.want) {
				t.Errorf("services:\n got %+v\nwant %+v", got, tc.want)
			}
			want := tc.wantSkipped
			if want == nil {
				want = map[string]int{}
			}
			if got := countReasons(skipped, nil); !maps.Equal(got, want) {
				t.Errorf("skipped = %v (%v), want %v", got, skipped, want)
			}
			if _, rejected := model.Sanitize(got); len(rejected) != 0 {
				t.Errorf("bridge validation rejects %v", rejected)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	b := newBackoff()
	var got []string
	for range 7 {
		got = append(got, b.next().String())
	}
	if want := []string{"100ms", "200ms", "400ms", "800ms", "1.6s", "3s", "3s"}; !slices.Equal(got, want) {
		t.Fatalf("waits = %v, want %v", got, want)
	}
	b.reset()
	if b.peek() != backoffMin {
		t.Fatal("reset did not go back to the start")
	}
}
