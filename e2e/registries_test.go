package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// TestEveryRegistryThroughIstiodAndEnvoy calls, from the mesh, one service that lives only in
// Consul, one only in ZooKeeper (a Dubbo REST provider) and one only in Eureka.
func TestEveryRegistryThroughIstiodAndEnvoy(t *testing.T) {
	deps := testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	zkSrv := testenv.StartZooKeeper(t)
	eureka := testenv.StartEureka(t)

	cHost, cPort := startHTTPServer(t, "from consul")
	register(t, consulClient(t, consul.HTTPAddr), "inventory", "inventory-1", cHost, cPort)
	zHost, zPort := startHTTPServer(t, "from dubbo on zookeeper")
	if err := testenv.DubboProvider(zkSrv.Addr, "org.example.PriceService", "rest", zHost, zPort, false, "version=1.0.0"); err != nil {
		t.Fatal(err)
	}
	eHost, ePort := startHTTPServer(t, "from eureka")
	if err := testenv.EurekaInstance(eureka.URL, "ORDERS", "orders-1", eHost, ePort, false); err != nil {
		t.Fatal(err)
	}

	mt := startXDSWith(t, "-consul", consul.HTTPAddr, "-zookeeper", zkSrv.Addr, "-eureka", eureka.URL)
	istiod := testenv.StartIstiod(t, mt.MCPAddr)
	sc := startSidecar(t, deps.Envoy, istiod.XDSAddr)

	for _, c := range []struct{ target, want string }{
		{fmt.Sprintf("http://inventory.service.consul:%d/", cPort), "from consul"},
		{fmt.Sprintf("http://org.example.priceservice.v1-0-0.dubbo:%d/", zPort), "from dubbo on zookeeper"},
		{fmt.Sprintf("http://orders.eureka:%d/", ePort), "from eureka"},
	} {
		took, err := sc.awaitCall(c.target, 60*time.Second, "call "+c.want, func(code int, body string) bool {
			return code == 200 && strings.Contains(body, c.want)
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s answered %s after the sidecar was ready", c.target, took)
	}
}

// TestReverseRegistrationThroughTheDaemon configures meshturbo-xds to register a mesh service
// into Consul and Eureka: non-mesh callers that read only one of them reach it, and it is gone
// from both when meshturbo-xds stops.
func TestReverseRegistrationThroughTheDaemon(t *testing.T) {
	testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	eureka := testenv.StartEureka(t)
	host, port := startHTTPServer(t, "mesh greeter")
	cfg := fmt.Sprintf(`
sources:
- consul: {address: %s}
  registerMeshServices: true
- eureka: {urls: [%s]}
  registerMeshServices: true
meshServices:
- {name: greeter, address: %s, port: %d, protocol: http}
`, consul.HTTPAddr, eureka.URL, host, port)
	path := filepath.Join(t.TempDir(), "meshturbo-xds.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	mt := startXDSWith(t, "-config", path)
	cc := consulClient(t, consul.HTTPAddr)

	callVia := func(registry string, lookup func() (string, error)) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		var last error
		for time.Now().Before(deadline) {
			addr, err := lookup()
			if err == nil {
				resp, err := http.Get("http://" + addr + "/")
				if err == nil {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if strings.Contains(string(b), "mesh greeter") {
						return
					}
				}
				last = err
			} else {
				last = err
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("a non-mesh client reading only %s never reached greeter: %v", registry, last)
	}
	consulLookup := func() (string, error) {
		entries, _, err := cc.Health().Service("greeter", "", true, nil)
		if err != nil || len(entries) == 0 {
			return "", fmt.Errorf("no passing greeter in consul (%v)", err)
		}
		return fmt.Sprintf("%s:%d", entries[0].Service.Address, entries[0].Service.Port), nil
	}
	eurekaLookup := func() (string, error) { return testenv.EurekaUpInstance(eureka.URL, "GREETER") }
	callVia("consul", consulLookup)
	callVia("eureka", eurekaLookup)

	if err := mt.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := consulLookup(); err == nil {
		t.Error("greeter still in consul after meshturbo-xds stopped")
	}
	if _, err := eurekaLookup(); err == nil {
		t.Error("greeter still in eureka after meshturbo-xds stopped")
	}
}
