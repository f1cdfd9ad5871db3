package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	raw := `
listen: 127.0.0.1:16000
istio: {namespace: legacy, vipRange: 10.250.0.0/16}
retention: 2m
sources:
- consul: {address: 127.0.0.1:8500, tokenFile: ` + token + `}
  include: ["*.service.consul"]
- zookeeper: {servers: [127.0.0.1:2181]}
- eureka: {urls: [http://127.0.0.1:8761/eureka]}
`
	c, err := ParseConfig([]byte(raw), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:16000" || c.Admin.Listen != "127.0.0.1:15051" || c.Retention.Duration != 2*time.Minute ||
		c.Istio.Namespace != "legacy" || c.Sources[0].Consul.Address != "127.0.0.1:8500" {
		t.Fatalf("config = %+v", c)
	}
	ws, err := c.watchers(discard())
	if err != nil || len(ws) != 3 {
		t.Fatalf("watchers = %v, %v", ws, err)
	}
}

func TestParseConfigNamesTheBadField(t *testing.T) {
	for _, tc := range []struct{ raw, want string }{
		{"sources: []", "sources: at least one registry is required"},
		{"sources:\n- consul: {}", "sources[0].consul.address: required"},
		{"sources:\n- {}", "sources[0]: needs exactly one registry block"},
		{"sources:\n- {eureka: {urls: [ftp://x]}}", "sources[0].eureka.urls[0]"},
		{"sources:\n- {zookeeper: {}}", "sources[0].zookeeper.servers"},
		{"sources:\n- {zookeeper: {servers: [a:1]}, consul: {address: a:1}}", "exactly one registry block"},
		{"sources:\n- consul: {adress: x:1}", "field adress not found"},
		{"retention: soon\nsources:\n- consul: {address: a:1}", `"soon" is not a duration`},
		{"istio: {vipRange: 300.0.0.0/8}\nsources:\n- consul: {address: a:1}", "istio.vipRange"},
		{"merge: both\nsources:\n- consul: {address: a:1}", `merge: "both" is not priority or union`},
		{"meshServices: [{name: g, address: host, port: 1}]\nsources:\n- consul: {address: a:1}", "meshServices[0]"},
		{"admin: {listen: nohostport}\nsources:\n- consul: {address: a:1}", "admin.listen"},
		{"sources:\n- consul: {address: a:1, tokenFile: /nonexistent/token}", "sources[0].consul.tokenFile"},
	} {
		_, err := ParseConfig([]byte(tc.raw), "bad.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "bad.yaml") {
			t.Errorf("%q: err = %v, want it to name the file and contain %q", tc.raw, err, tc.want)
		}
	}
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
