package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Consul is a single-node Consul agent in dev mode (in-memory state).
type Consul struct {
	*Process
	HTTPAddr string // "127.0.0.1:port" of the HTTP API
}

// StartConsul runs `consul agent -dev` on 127.0.0.1 with every port free or disabled, and
// returns once it has elected itself leader.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	c, err := StartConsulIn(testEnv(t), RequireDeps(t))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return c
}

// StartConsulIn is StartConsul outside a test.
func StartConsulIn(env *Env, d Deps) (*Consul, error) {
	dir, err := env.workDir("consul")
	if err != nil {
		return nil, fmt.Errorf("start consul: %w", err)
	}
	ports, err := FreeLoopbackPorts(5)
	if err != nil {
		return nil, err
	}
	httpPort, serfLAN, serfWAN, server, grpcTLS := ports[0], ports[1], ports[2], ports[3], ports[4]
	// Consul 1.20 ignores -1 (disabled) for serf_wan and grpc_tls in dev mode and falls back to
	// fixed defaults, so those get free ports too.
	cfg := map[string]any{
		"disable_update_check": true,
		// One blocking query per watched service: large catalogs need more than the default
		// 200 concurrent connections from one client.
		"limits": map[string]int{"http_max_conns_per_client": 15000},
		"ports": map[string]int{
			"http":     httpPort,
			"https":    -1,
			"dns":      -1,
			"grpc":     -1,
			"grpc_tls": grpcTLS,
			"serf_lan": serfLAN,
			"serf_wan": serfWAN,
			"server":   server,
		},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, "consul.json")
	if err := os.WriteFile(cfgPath, cfgJSON, 0o644); err != nil {
		return nil, fmt.Errorf("start consul: %w", err)
	}
	cmd := exec.Command(d.Consul, "agent", "-dev",
		"-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-node", "meshturbo-test",
		"-data-dir", filepath.Join(dir, "data"),
		"-config-file", cfgPath)
	cmd.Dir = dir
	addr := Addr(httpPort)
	p, err := StartIn(env, "consul", cmd, consulLeaderProbe(addr), time.Minute)
	if err != nil {
		return nil, err
	}
	return &Consul{Process: p, HTTPAddr: addr}, nil
}

// consulLeaderProbe succeeds once GET /v1/status/leader names a leader.
func consulLeaderProbe(addr string) func(context.Context) error {
	return HTTPProbe("http://"+addr+"/v1/status/leader", func(status int, body []byte) error {
		if status != http.StatusOK {
			return fmt.Errorf("status %d: %.200s", status, body)
		}
		var leader string
		if err := json.Unmarshal(body, &leader); err != nil {
			return fmt.Errorf("decode leader %q: %w", body, err)
		}
		if leader == "" {
			return fmt.Errorf("no leader yet")
		}
		return nil
	})
}

// URL is the base URL of the HTTP API, e.g. "http://127.0.0.1:8500".
func (c *Consul) URL() string { return "http://" + c.HTTPAddr }
