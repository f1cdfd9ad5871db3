package e2e

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/xds"
)

func consulClient(t *testing.T, addr string) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = addr
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func register(t *testing.T, c *api.Client, name, id, host string, port int) {
	t.Helper()
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: name, Address: host, Port: port, Meta: map[string]string{"protocol": "http"},
	})
	if err != nil {
		t.Fatalf("register %s in consul: %v", id, err)
	}
}

// TestConsulServiceThroughIstiodAndEnvoy is the walking skeleton: an HTTP server registered
// only in Consul is called through a real Envoy sidecar configured by a real istiod fed by
// meshturbo-xds. Deregistering it removes it from Envoy; registering it again brings it back.
func TestConsulServiceThroughIstiodAndEnvoy(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)

	host, port := startHTTPServer(t, "hello from a consul-only service")
	register(t, cc, "hello", "hello-1", host, port)

	mt := startXDS(t, consul.HTTPAddr)
	istiod := testenv.StartIstiod(t, mt.MCPAddr)
	sc := startSidecar(t, deps.Envoy, istiod.XDSAddr)

	target := fmt.Sprintf("http://hello.service.consul:%d/", port)
	ok := func(code int, body string) bool {
		return code == 200 && strings.Contains(body, "hello from a consul-only service")
	}
	noUpstream := func(code int, body string) bool { return code == 503 && strings.Contains(body, "no healthy upstream") }

	took, err := sc.awaitCall(target, 60*time.Second, "first call to the Consul service", ok)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first call succeeded %s after the sidecar was ready", took)

	if err := cc.Agent().ServiceDeregister("hello-1"); err != nil {
		t.Fatal(err)
	}
	took, err = sc.awaitCall(target, 5*time.Second, "removal of the deregistered instance", noUpstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("deregistration reached Envoy in %s", took)

	register(t, cc, "hello", "hello-1", host, port)
	took, err = sc.awaitCall(target, 5*time.Second, "return of the re-registered instance", ok)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("re-registration reached Envoy in %s", took)
}

// TestCutLinkFailsClearly points istiod at an MCP server that knows nothing of Consul: the
// call must fail, and the failure must say what was not seen and what Envoy answered.
func TestCutLinkFailsClearly(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	host, port := startHTTPServer(t, "unreachable")
	register(t, consulClient(t, consul.HTTPAddr), "hello", "hello-1", host, port)
	startXDS(t, consul.HTTPAddr) // running, but istiod is not pointed at it

	empty, err := xds.New(xds.Config{Addr: "127.0.0.1:0", Store: xds.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { empty.Close() })
	istiod := testenv.StartIstiod(t, empty.Addr())
	sc := startSidecar(t, deps.Envoy, istiod.XDSAddr)

	target := fmt.Sprintf("http://hello.service.consul:%d/", port)
	_, err = sc.awaitCall(target, 3*time.Second, "call to the Consul service", func(code int, _ string) bool { return code == 200 })
	if err == nil {
		t.Fatal("the call succeeded although istiod never heard of the service")
	}
	for _, want := range []string{"hello.service.consul", "last answer"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("failure %q does not mention %q", err, want)
		}
	}
	t.Logf("cut link reported as: %v", err)
}

// TestMalformedServiceIsSkippedAndTheRestServed registers an instance whose address is not an
// IP next to a good service: the bad one is skipped with a reason, the good one is served.
func TestMalformedServiceIsSkippedAndTheRestServed(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)
	host, port := startHTTPServer(t, "good service")
	register(t, cc, "good", "good-1", host, port)
	register(t, cc, "bad", "bad-1", "db.example.com", 8080) // not an IP

	mt := startXDS(t, consul.HTTPAddr)
	istiod := testenv.StartIstiod(t, mt.MCPAddr)
	sc := startSidecar(t, deps.Envoy, istiod.XDSAddr)

	if _, err := sc.awaitCall(fmt.Sprintf("http://good.service.consul:%d/", port), 60*time.Second, "call to the good service",
		func(code int, body string) bool { return code == 200 && strings.Contains(body, "good service") }); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + mt.AdminAddr + "/v1/registries")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "bad-1") || !strings.Contains(string(body), "is not an IP address") {
		t.Errorf("admin status does not report the skipped instance with its reason: %s", body)
	}
	resp, err = http.Get("http://" + mt.AdminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`meshturbo_bridge_skipped_entries{reason="bad_address",source="consul"} 1`,
		`meshturbo_bridge_stale{source="consul"} 0`,
		`meshturbo_xds_clients 1`,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if !strings.Contains(mt.Tail(200), "is not an IP address") {
		t.Errorf("meshturbo-xds log does not give the reason for skipping bad-1")
	}
}
