package zookeeper

import (
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/meshturbo/meshturbo/model"
)

const demoURL = "dubbo://192.168.1.2:20880/org.apache.dubbo.demo.DemoService?anyhost=true&application=demo-provider" +
	"&deprecated=false&dubbo=2.0.2&dynamic=true&generic=false&interface=org.apache.dubbo.demo.DemoService" +
	"&methods=sayHello,sayHelloAsync&pid=4242&release=3.2.0&side=provider&timestamp=1690000000000"

func TestParseDubboURL(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Provider // compared field by field; Params only for the keys listed
		wantErr error
	}{
		{
			name: "decoded URL as Dubbo writes it",
			in:   demoURL,
			want: Provider{Protocol: "dubbo", Host: "192.168.1.2", Port: 20880, Path: "org.apache.dubbo.demo.DemoService",
				Interface: "org.apache.dubbo.demo.DemoService", Params: map[string]string{"application": "demo-provider", "side": "provider", "methods": "sayHello,sayHelloAsync"}},
		},
		{
			name: "the znode name, percent-encoded as a whole",
			in:   url.QueryEscape(demoURL),
			want: Provider{Protocol: "dubbo", Host: "192.168.1.2", Port: 20880, Path: "org.apache.dubbo.demo.DemoService",
				Interface: "org.apache.dubbo.demo.DemoService", Params: map[string]string{"release": "3.2.0"}},
		},
		{
			name: "triple with group and version",
			in:   "tri://10.0.0.7:50051/com.example.Greeter?group=prod&version=1.0.0&weight=200",
			want: Provider{Protocol: "tri", Host: "10.0.0.7", Port: 50051, Path: "com.example.Greeter", Interface: "com.example.Greeter",
				Params: map[string]string{"group": "prod", "version": "1.0.0", "weight": "200"}},
		},
		{
			name: "upper-case scheme, user info, interface parameter differs from path",
			in:   "REST://admin:secret@10.1.2.3:8080/api/v1?interface=com.example.Api",
			want: Provider{Protocol: "rest", Host: "10.1.2.3", Port: 8080, Path: "api/v1", Interface: "com.example.Api"},
		},
		{
			name: "bracketed IPv6",
			in:   "grpc://[fd00::1]:9090/com.example.Svc",
			want: Provider{Protocol: "grpc", Host: "fd00::1", Port: 9090, Path: "com.example.Svc", Interface: "com.example.Svc"},
		},
		{
			name: "unbracketed IPv6, port after the last colon",
			in:   "dubbo://fd00::2:20880/com.example.Svc",
			want: Provider{Protocol: "dubbo", Host: "fd00::2", Port: 20880, Path: "com.example.Svc", Interface: "com.example.Svc"},
		},
		{
			name: "IPv4-mapped IPv6 is unmapped",
			in:   "dubbo://[::ffff:10.0.0.9]:20880/com.example.Svc",
			want: Provider{Protocol: "dubbo", Host: "10.0.0.9", Port: 20880, Path: "com.example.Svc", Interface: "com.example.Svc"},
		},
		{
			name: "no path but interface parameter, odd params kept raw",
			in:   "dubbo://10.0.0.1:20880?interface=com.example.Svc&&=x&flag&enc=a%2Cb",
			want: Provider{Protocol: "dubbo", Host: "10.0.0.1", Port: 20880, Interface: "com.example.Svc",
				Params: map[string]string{"flag": "", "enc": "a%2Cb"}},
		},
		{name: "host name", in: "dubbo://provider.example.com:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "unspecified address", in: "dubbo://0.0.0.0:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "multicast address", in: "dubbo://224.0.0.1:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "IPv6 zone", in: "dubbo://[fe80::1%25eth0]:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "empty host", in: "dubbo://:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "unclosed bracket", in: "dubbo://[fd00::1:20880/com.example.Svc", wantErr: ErrBadHost},
		{name: "port 0", in: "dubbo://10.0.0.1:0/com.example.Svc", wantErr: ErrBadPort},
		{name: "port above 65535", in: "dubbo://10.0.0.1:70000/com.example.Svc", wantErr: ErrBadPort},
		{name: "negative port", in: "dubbo://10.0.0.1:-1/com.example.Svc", wantErr: ErrBadPort},
		{name: "no port", in: "dubbo://10.0.0.1/com.example.Svc", wantErr: ErrBadPort},
		{name: "port with sign", in: "dubbo://10.0.0.1:+80/com.example.Svc", wantErr: ErrBadPort},
		{name: "bracketed host without port", in: "dubbo://[fd00::1]/com.example.Svc", wantErr: ErrBadPort},
		{name: "bad percent-encoding", in: "dubbo%3A%2F%2F10.0.0.1%3A20880%2Fx%ZZ", wantErr: ErrBadEncoding},
		{name: "no scheme", in: "10.0.0.1:20880/com.example.Svc", wantErr: ErrBadURL},
		{name: "bad scheme", in: "1dubbo://10.0.0.1:20880/com.example.Svc", wantErr: ErrBadURL},
		{name: "empty", in: "", wantErr: ErrBadURL},
		{name: "no interface", in: "dubbo://10.0.0.1:20880/?application=x", wantErr: ErrBadURL},
		{name: "too long", in: "dubbo://10.0.0.1:20880/x?a=" + strings.Repeat("a", MaxDubboURLLen), wantErr: ErrTooLong},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseDubboURL(tc.in)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("ParseDubboURL() error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseDubboURL() error = %v", err)
			}
			w := tc.want
			if got.Protocol != w.Protocol || got.Host != w.Host || got.Port != w.Port || got.Path != w.Path || got.Interface != w.Interface {
				t.Errorf("ParseDubboURL() = %+v, want %+v", got, w)
			}
			for k, v := range w.Params {
				if gv, ok := got.Params[k]; !ok || gv != v {
					t.Errorf("param %q = %q (present %v), want %q", k, gv, ok, v)
				}
			}
		})
	}
}

func TestProviderAccessors(t *testing.T) {
	tests := []struct {
		query       string
		group, ver  string
		weight      uint32
		enabled     bool
		timestampMS int64
	}{
		{query: "", weight: DefaultWeight, enabled: true},
		{query: "group=g&version=2.1&weight=7&timestamp=123", group: "g", ver: "2.1", weight: 7, enabled: true, timestampMS: 123},
		{query: "default.group=dg&default.version=1.0&default.weight=50", group: "dg", ver: "1.0", weight: 50, enabled: true},
		{query: "version=0.0.0&weight=0", weight: 1, enabled: true},
		{query: "weight=-5", weight: 1, enabled: true},
		{query: "weight=lots", weight: DefaultWeight, enabled: true},
		{query: "weight=99999999999", weight: maxWeight, enabled: true},
		{query: "enabled=false", weight: DefaultWeight},
		{query: "disabled=TRUE", weight: DefaultWeight},
		{query: "enabled=true&disabled=false", weight: DefaultWeight, enabled: true},
	}
	for _, tc := range tests {
		p, err := ParseDubboURL("dubbo://10.0.0.1:20880/com.example.Svc?" + tc.query)
		if err != nil {
			t.Fatalf("%q: %v", tc.query, err)
		}
		if p.Group() != tc.group || p.Version() != tc.ver || p.Weight() != tc.weight || p.Enabled() != tc.enabled || p.Timestamp() != tc.timestampMS {
			t.Errorf("%q: group %q version %q weight %d enabled %v timestamp %d; want %q %q %d %v %d", tc.query,
				p.Group(), p.Version(), p.Weight(), p.Enabled(), p.Timestamp(), tc.group, tc.ver, tc.weight, tc.enabled, tc.timestampMS)
		}
	}
}

func TestDubboHostname(t *testing.T) {
	long := strings.Repeat("Segment", 12) // 84 characters
	tests := []struct {
		iface, group, version, domain string
		want                          string
		wantErr                       bool
	}{
		{iface: "org.apache.dubbo.demo.DemoService", domain: "dubbo", want: "org.apache.dubbo.demo.demoservice.dubbo"},
		{iface: "org.apache.dubbo.demo.DemoService", group: "prod", domain: "dubbo", want: "org.apache.dubbo.demo.demoservice.prod.dubbo"},
		{iface: "org.apache.dubbo.demo.DemoService", version: "1.0.0", domain: "dubbo", want: "org.apache.dubbo.demo.demoservice.v1-0-0.dubbo"},
		{iface: "org.apache.dubbo.demo.DemoService", group: "Prod.East", version: "V2", domain: "dubbo", want: "org.apache.dubbo.demo.demoservice.prod-east.v2.dubbo"},
		{iface: "com.example.Foo", version: "0.0.0", domain: "dubbo", want: "com.example.foo.dubbo"},
		{iface: "com.example.Foo", version: "2.0-SNAPSHOT", domain: "mesh.local", want: "com.example.foo.v2-0-snapshot.mesh.local"},
		{iface: "com.example.Outer$Inner_Svc", domain: "dubbo", want: "com.example.outer-inner-svc.dubbo"},
		{iface: "com..example._x_.Svc.", domain: "dubbo", want: "com.example.x.svc.dubbo"},
		{iface: "com.example.Svc", group: "a/b c", domain: "dubbo", want: "com.example.svc.a-b-c.dubbo"},
		{iface: "com.example.Svc", version: "-1", domain: "dubbo", want: "com.example.svc.v1.dubbo"},
		{iface: "com.example." + long, domain: "dubbo", want: "com.example." + strings.ToLower(long)[:54] + "-" + fnvHex(long) + ".dubbo"},
		{iface: "...", domain: "dubbo", wantErr: true},
		{iface: "com.example.Svc", group: "$$$", domain: "dubbo", wantErr: true},
		{iface: "com.example.Svc", version: "...", domain: "dubbo", wantErr: true},
		{iface: strings.Repeat("abcdefghij.", 30), domain: "dubbo", wantErr: true},
	}
	for _, tc := range tests {
		got, err := DubboHostname(tc.iface, tc.group, tc.version, tc.domain)
		if tc.wantErr {
			if !errors.Is(err, ErrBadName) {
				t.Errorf("DubboHostname(%q, %q, %q) = %q, %v; want ErrBadName", tc.iface, tc.group, tc.version, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("DubboHostname(%q, %q, %q) = %q, %v; want %q", tc.iface, tc.group, tc.version, got, err, tc.want)
		}
		if err == nil && !model.ValidHostname(got) {
			t.Errorf("DubboHostname(%q, %q, %q) = %q, not a valid host name", tc.iface, tc.group, tc.version, got)
		}
	}
}

func fnvHex(s string) string {
	l := dnsLabel(s)
	return l[len(l)-8:]
}

func TestCuratorHostname(t *testing.T) {
	for in, want := range map[string]string{
		"orders":          "orders.curator",
		"User_Service":    "user-service.curator",
		"com.example.Api": "com.example.api.curator",
		"café":            "caf.curator",
	} {
		if got, err := CuratorHostname(in, "curator"); err != nil || got != want {
			t.Errorf("CuratorHostname(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if got, err := CuratorHostname("__", "curator"); !errors.Is(err, ErrBadName) {
		t.Errorf("CuratorHostname(%q) = %q, %v; want ErrBadName", "__", got, err)
	}
}

func TestDubboProtocol(t *testing.T) {
	w, err := New(Config{Servers: []string{"127.0.0.1:2181"}})
	if err != nil {
		t.Fatal(err)
	}
	r := newRun(w, nil)
	want := map[string]model.Protocol{"dubbo": model.ProtocolTCP, "tri": model.ProtocolGRPC, "grpc": model.ProtocolGRPC,
		"rest": model.ProtocolHTTP, "http": model.ProtocolHTTP, "h2c": model.ProtocolHTTP2, "hessian": model.ProtocolTCP}
	for in, p := range want {
		if got := r.dubboProtocol(in); got != p {
			t.Errorf("dubboProtocol(%q) = %s, want %s", in, got, p)
		}
	}
	w2, err := New(Config{Servers: []string{"127.0.0.1:2181"}, Protocols: map[string]model.Protocol{"dubbo": model.ProtocolHTTP2}})
	if err != nil {
		t.Fatal(err)
	}
	if got := newRun(w2, nil).dubboProtocol("dubbo"); got != model.ProtocolHTTP2 {
		t.Errorf("with Protocols override: dubbo = %s, want HTTP2", got)
	}
}
