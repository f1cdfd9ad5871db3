package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// These tests start the real components installed by `make deps`.

func TestConsul(t *testing.T) {
	t.Parallel()
	c := StartConsul(t)

	reg := `{"ID": "web-1", "Name": "web", "Address": "127.0.0.1", "Port": 8080, "Tags": ["v1"]}`
	status, body := do(t, http.MethodPut, c.URL()+"/v1/agent/service/register", reg)
	if status != http.StatusOK {
		t.Fatalf("register: status %d: %s", status, body)
	}
	eventually(t, 10*time.Second, func() error {
		status, body := do(t, http.MethodGet, c.URL()+"/v1/catalog/service/web", "")
		if status != http.StatusOK {
			return fmt.Errorf("status %d: %s", status, body)
		}
		var nodes []struct {
			ServiceID   string
			ServicePort int
		}
		if err := json.Unmarshal(body, &nodes); err != nil {
			return err
		}
		if len(nodes) != 1 || nodes[0].ServiceID != "web-1" || nodes[0].ServicePort != 8080 {
			return fmt.Errorf("catalog has %+v, want web-1 on port 8080", nodes)
		}
		return nil
	})
}

func TestZooKeeper(t *testing.T) {
	t.Parallel()
	z := StartZooKeeper(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	srvr, err := FourLetterWord(ctx, z.Addr, "srvr")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(srvr, "Mode: standalone") {
		t.Errorf("srvr = %q, want a standalone server", srvr)
	}

	z.Restart(t)
	if reply, err := FourLetterWord(ctx, z.Addr, "ruok"); err != nil || reply != "imok" {
		t.Fatalf("ruok after restart = %q, %v", reply, err)
	}
	if !strings.Contains(z.Tail(TailLines*10), "binding to port") {
		t.Errorf("the log does not show ZooKeeper's own output:\n%s", z.Tail(20))
	}
}

func TestEureka(t *testing.T) {
	t.Parallel()
	e := StartEureka(t)

	instance := `{"instance": {
		"instanceId": "127.0.0.1:orders:8080",
		"hostName": "127.0.0.1",
		"app": "ORDERS",
		"ipAddr": "127.0.0.1",
		"status": "UP",
		"port": {"$": 8080, "@enabled": "true"},
		"dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"}
	}}`
	status, body := do(t, http.MethodPost, e.URL+"/apps/ORDERS", instance)
	if status != http.StatusNoContent {
		t.Fatalf("register: status %d: %s", status, body)
	}
	eventually(t, 10*time.Second, func() error {
		status, body := do(t, http.MethodGet, e.URL+"/apps", "")
		if status != http.StatusOK {
			return fmt.Errorf("status %d: %s", status, body)
		}
		var apps struct {
			Applications struct {
				Application []struct {
					Name     string
					Instance []struct {
						InstanceID string
						Status     string
					}
				}
			}
		}
		if err := json.Unmarshal(body, &apps); err != nil {
			return fmt.Errorf("decode %s: %w", body, err)
		}
		a := apps.Applications.Application
		if len(a) != 1 || a[0].Name != "ORDERS" || len(a[0].Instance) != 1 ||
			a[0].Instance[0].InstanceID != "127.0.0.1:orders:8080" || a[0].Instance[0].Status != "UP" {
			return fmt.Errorf("apps = %s, want ORDERS with one UP instance", body)
		}
		return nil
	})
}

// Without an MCP server istiod exits at once; StartIstiod must say so quickly, with the log.
func TestIstiodWithoutMCPServerFailsFast(t *testing.T) {
	t.Parallel()
	d := RequireDeps(t)
	dead := Addr(FreePort(t)) // nothing listens there
	begin := time.Now()
	_, err := StartIstiodIn(testEnv(t), d, dead)
	if err == nil {
		t.Fatal("StartIstiodIn() = nil error without an MCP server")
	}
	if elapsed := time.Since(begin); elapsed > 30*time.Second {
		t.Errorf("StartIstiodIn() took %v to fail", elapsed)
	}
	if !strings.Contains(err.Error(), "istiod exited before it was ready") || !strings.Contains(err.Error(), "--- last") {
		t.Errorf("error does not say that istiod exited or lacks the log tail:\n%v", err)
	}
	t.Logf("the error, as a test would see it:\n%v", err)
}

func TestEnvoy(t *testing.T) {
	d := RequireDeps(t)
	for _, v := range []struct{ binary, version string }{
		{d.Envoy, d.EnvoyVersion},
		{d.EnvoyOld, d.EnvoyOldVersion},
	} {
		t.Run(v.version, func(t *testing.T) {
			t.Parallel() // two Envoys at once: dynamic base ids keep them apart
			port := FreePort(t)
			bootstrap := filepath.Join(t.TempDir(), "bootstrap.yaml")
			if err := os.WriteFile(bootstrap, []byte(fmt.Sprintf(envoyTestBootstrap, port)), 0o644); err != nil {
				t.Fatal(err)
			}
			e := StartEnvoy(t, v.binary, bootstrap, "--concurrency", "1")

			status, body := do(t, http.MethodGet, e.AdminURL("/server_info"), "")
			if status != http.StatusOK || !strings.Contains(string(body), "/"+v.version+"/") {
				t.Errorf("server_info: status %d, want version %s in %.300s", status, v.version, body)
			}
			status, body = do(t, http.MethodGet, fmt.Sprintf("http://%s/", Addr(port)), "")
			if status != http.StatusOK || string(body) != "hello from envoy" {
				t.Errorf("GET listener: status %d body %q", status, body)
			}

			e.Restart(t)
			status, _ = do(t, http.MethodGet, e.AdminURL("/ready"), "")
			if status != http.StatusOK {
				t.Errorf("ready after restart: status %d", status)
			}
		})
	}
}

const envoyTestBootstrap = `
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: 0}
static_resources:
  listeners:
  - name: hello
    address:
      socket_address: {address: 127.0.0.1, port_value: %d}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hello
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                direct_response: {status: 200, body: {inline_string: "hello from envoy"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
`

// do sends one request with a JSON body (if any) and returns the status and body.
func do(t *testing.T, method, url, body string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader([]byte(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json")
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, b
}

// eventually retries cond every 100 ms until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not true after %v: %v", timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
