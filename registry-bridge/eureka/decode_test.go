package eureka

import (
	"maps"
	"strings"
	"testing"

	"github.com/meshturbo/meshturbo/model"
)

// fullAnswer is GET /eureka/apps as our Spring Cloud Eureka server writes it (trimmed).
const fullAnswer = `{"applications":{"versions__delta":"1","apps__hashcode":"DOWN_1_UP_2_","application":[
 {"name":"ORDERS","instance":[
  {"instanceId":"o1","hostName":"h-o1","app":"ORDERS","ipAddr":"10.0.0.1","status":"UP","overriddenStatus":"UNKNOWN",
   "port":{"$":8080,"@enabled":"true"},"securePort":{"$":8443,"@enabled":"false"},"countryId":1,
   "dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},
   "leaseInfo":{"renewalIntervalInSecs":30,"durationInSecs":300},
   "metadata":{"protocol":"http","mesh":"true"},"isCoordinatingDiscoveryServer":"false",
   "lastUpdatedTimestamp":"1795433101363","lastDirtyTimestamp":"1795433101296","actionType":"ADDED"},
  {"instanceId":"o2","hostName":"h-o2","app":"ORDERS","ipAddr":"10.0.0.2","status":"DOWN",
   "port":{"$":8080,"@enabled":"true"},"securePort":{"$":7002,"@enabled":"false"},
   "metadata":{"@class":"java.util.Collections$EmptyMap"},"actionType":"ADDED"}]},
 {"name":"PAY","instance":[
  {"instanceId":"p1","hostName":"h-p1","app":"PAY","ipAddr":"10.0.0.3","status":"UP",
   "port":{"$":9090,"@enabled":"true"},"securePort":{"$":8443,"@enabled":"false"},"actionType":"ADDED"}]}]}}`

// deltaAnswer is GET /eureka/apps/delta after o2 was deleted and p1 taken out of service.
const deltaAnswer = `{"applications":{"versions__delta":"5","apps__hashcode":"OUT_OF_SERVICE_1_UP_1_","application":[
 {"name":"ORDERS","instance":[{"instanceId":"o2","app":"ORDERS","ipAddr":"10.0.0.2","status":"DOWN",
   "port":{"$":8080,"@enabled":"true"},"actionType":"DELETED"}]},
 {"name":"PAY","instance":[{"instanceId":"p1","app":"PAY","ipAddr":"10.0.0.3","status":"OUT_OF_SERVICE",
   "overriddenStatus":"OUT_OF_SERVICE","port":{"$":9090,"@enabled":"true"},"actionType":"MODIFIED"}]}]}}`

func TestDecodeFullAndDelta(t *testing.T) {
	full, err := decodeApps([]byte(fullAnswer))
	if err != nil {
		t.Fatal(err)
	}
	if !full.HasHashCode || full.HashCode != "DOWN_1_UP_2_" {
		t.Fatalf("hash = %q (present %v)", full.HashCode, full.HasHashCode)
	}
	o1 := full.Apps["ORDERS"]["o1"]
	if o1 == nil || o1.IPAddr != "10.0.0.1" || o1.Status != statusUp ||
		o1.Port != (portSpec{Number: 8080, Enabled: true, EnabledSet: true, Present: true}) ||
		o1.SecurePort != (portSpec{Number: 8443, Enabled: false, EnabledSet: true, Present: true}) ||
		!maps.Equal(o1.Metadata, map[string]string{"protocol": "http", "mesh": "true"}) {
		t.Fatalf("o1 = %+v", o1)
	}
	if md := full.Apps["ORDERS"]["o2"].Metadata; md != nil {
		t.Errorf("empty-map metadata decoded as %v, want nil", md)
	}
	reg := newRegistry(full)
	if got := reg.hashCode(); got != full.HashCode {
		t.Fatalf("hash of the full answer = %q, server says %q", got, full.HashCode)
	}

	delta, err := decodeApps([]byte(deltaAnswer))
	if err != nil {
		t.Fatal(err)
	}
	next := reg.apply(delta)
	if got := next.hashCode(); got != delta.HashCode {
		t.Fatalf("hash after delta = %q, server says %q", got, delta.HashCode)
	}
	if _, ok := next.apps["ORDERS"]["o2"]; ok {
		t.Error("deleted o2 still present")
	}
	if _, ok := reg.apps["ORDERS"]["o2"]; !ok || reg.apps["PAY"]["p1"].Status != statusUp {
		t.Error("apply changed the registry it was applied to")
	}
}

func TestDecodeQuirks(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		check      func(t *testing.T, d *document)
		wantErr    string
		unreadable map[string]int
	}{
		{
			name: "application and instance as single objects",
			in: `{"applications":{"apps__hashcode":"UP_1_","application":{"name":"a","instance":
				{"instanceId":"i1","ipAddr":"10.0.0.1","status":"up","port":{"$":"8080","@enabled":true}}}}}`,
			check: func(t *testing.T, d *document) {
				in := d.Apps["A"]["i1"]
				if in == nil || in.Status != statusUp || in.Port.Number != 8080 || !in.Port.Enabled {
					t.Fatalf("instance = %+v", in)
				}
			},
		},
		{
			name: "null and missing lists",
			in:   `{"applications":{"application":[{"name":"A","instance":null},{"name":"B"}]}}`,
			check: func(t *testing.T, d *document) {
				if len(d.Apps) != 0 || d.HasHashCode {
					t.Fatalf("doc = %+v", d)
				}
			},
		},
		{
			name: "bare port number, odd metadata, unknown status",
			in: `{"applications":{"application":[{"name":"A","instance":[{"instanceId":"i1","ipAddr":"10.0.0.1",
				"status":"SLEEPING","port":8080,"metadata":{"n":1,"b":true,"o":{"x":1},"z":null," ":"blank","@class":"x"}}]}]}}`,
			check: func(t *testing.T, d *document) {
				in := d.Apps["A"]["i1"]
				if in.Status != statusUnknown || in.Port != (portSpec{Number: 8080, Present: true}) {
					t.Fatalf("instance = %+v", in)
				}
				if want := map[string]string{"n": "1", "b": "true"}; !maps.Equal(in.Metadata, want) {
					t.Fatalf("metadata = %v, want %v", in.Metadata, want)
				}
			},
		},
		{
			name: "instance ID falls back to the host name, app name to the instance's",
			in:   `{"applications":{"application":[{"instance":[{"hostName":"h1","app":"orders","ipAddr":"10.0.0.1"}]}]}}`,
			check: func(t *testing.T, d *document) {
				if d.Apps["ORDERS"]["h1"] == nil {
					t.Fatalf("apps = %+v", d.Apps)
				}
			},
		},
		{
			name: "port that is not a number",
			in:   `{"applications":{"application":[{"name":"A","instance":[{"instanceId":"i","port":{"$":"eighty"}}]}]}}`,
			check: func(t *testing.T, d *document) {
				if p := d.Apps["A"]["i"].Port; p.Number != -1 || !p.Present {
					t.Fatalf("port = %+v", p)
				}
			},
		},
		{
			name: "duplicates are counted on the first",
			in: `{"applications":{"application":[{"name":"A","instance":[{"instanceId":"i","ipAddr":"10.0.0.1"},
				{"instanceId":"i","ipAddr":"10.0.0.2"}]},{"name":"A","instance":{"instanceId":"i","ipAddr":"10.0.0.3"}}]}}`,
			check: func(t *testing.T, d *document) {
				if in := d.Apps["A"]["i"]; in.IPAddr != "10.0.0.1" || in.Dupes != 2 {
					t.Fatalf("instance = %+v", in)
				}
			},
		},
		{
			name: "unreadable entries are counted, the rest kept",
			in: `{"applications":{"application":[7,{"name":5},{"name":"A","instance":"x"},{"name":"B","instance":[
				{"instanceId":1},{"ipAddr":"10.0.0.1"},{"instanceId":"ok","ipAddr":"10.0.0.2"}]},{"instance":[{"instanceId":"i"}]}]}}`,
			unreadable: map[string]int{reasonMalformedApp: 3, reasonMalformedInstance: 1, reasonMissingID: 1, reasonMissingApp: 1},
			check: func(t *testing.T, d *document) {
				if len(d.Apps) != 1 || d.Apps["B"]["ok"] == nil {
					t.Fatalf("apps = %+v", d.Apps)
				}
			},
		},
		{name: "not JSON", in: `<html>502 Bad Gateway</html>`, wantErr: "invalid character"},
		{name: "truncated", in: fullAnswer[:len(fullAnswer)/2], wantErr: "unexpected end"},
		{name: "no applications", in: `{"apps":[]}`, wantErr: `no "applications"`},
		{name: "applications is not an object", in: `{"applications":[]}`, wantErr: "cannot unmarshal"},
		{name: "application is a string", in: `{"applications":{"application":"ORDERS"}}`, wantErr: "want an object or an array"},
		{name: "hash code is a number", in: `{"applications":{"apps__hashcode":5}}`, wantErr: "apps__hashcode"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := decodeApps([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := tc.unreadable
			if want == nil {
				want = map[string]int{}
			}
			if !maps.Equal(d.Unreadable, want) {
				t.Errorf("unreadable = %v, want %v", d.Unreadable, want)
			}
			if tc.check != nil {
				tc.check(t, d)
			}
		})
	}
}

// FuzzDecodeApps feeds arbitrary answers through everything a fetched answer goes through:
// decoding, building and updating the registry, hashing and mapping to services. Nothing may
// panic, and what is published must pass the bridge's validation untouched.
func FuzzDecodeApps(f *testing.F) {
	f.Add([]byte(fullAnswer))
	f.Add([]byte(deltaAnswer))
	f.Add([]byte(`{"applications":{"application":{"name":"a","instance":{"instanceId":"i","ipAddr":"::1","port":{"$":"1","@enabled":true}}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		doc, err := decodeApps(data)
		if err != nil {
			return
		}
		reg := newRegistry(doc).apply(doc)
		_ = reg.hashCode()
		svcs, skipped := reg.services(mapping{domain: DefaultDomain, meshedMetaKey: DefaultMeshedMetaKey})
		_ = countReasons(skipped, doc.Unreadable)
		clean, rejected := model.Sanitize(svcs)
		if len(rejected) != 0 || len(clean) != len(svcs) {
			t.Fatalf("published services fail validation: %v", rejected)
		}
		for _, s := range svcs {
			for _, e := range s.Endpoints {
				if in := reg.apps[strings.ToUpper(strings.TrimSuffix(s.Hostname, "."+DefaultDomain))][e.ID]; in == nil || in.Status != statusUp {
					t.Fatalf("endpoint %s of %s is not an UP instance", e.ID, s.Hostname)
				}
			}
		}
	})
}
