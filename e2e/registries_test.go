package e2e

import (
	"bytes"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/meshturbo/meshturbo/internal/testenv"
)

// registerDubbo writes a Dubbo provider node for a REST (HTTP) provider, as a Dubbo
// application registering into ZooKeeper would.
func registerDubbo(t *testing.T, zkAddr, iface, host string, port int) {
	t.Helper()
	conn, _, err := zk.Connect([]string{zkAddr}, 10*time.Second, zk.WithLogInfo(false))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	providerURL := fmt.Sprintf("rest://%s:%d/%s?application=demo-provider&interface=%s&side=provider&version=1.0.0&weight=100",
		host, port, iface, iface)
	path := ""
	for _, p := range []string{"dubbo", iface, "providers"} {
		path += "/" + p
		if _, err := conn.Create(path, nil, 0, zk.WorldACL(zk.PermAll)); err != nil && err != zk.ErrNodeExists {
			t.Fatalf("create %s: %v", path, err)
		}
	}
	if _, err := conn.Create(path+"/"+url.QueryEscape(providerURL), nil, 0, zk.WorldACL(zk.PermAll)); err != nil {
		t.Fatalf("register dubbo provider: %v", err)
	}
}

// registerEureka registers an UP instance of app, as a Spring Cloud service would.
func registerEureka(t *testing.T, base, app, host string, port int) {
	t.Helper()
	body := fmt.Sprintf(`{"instance":{"instanceId":"%s-1","hostName":"%s","app":"%s","ipAddr":"%s","status":"UP",
		"port":{"$":%d,"@enabled":"true"},"securePort":{"$":443,"@enabled":"false"},
		"dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},
		"vipAddress":"%s","metadata":{"protocol":"http"}}}`, strings.ToLower(app), host, app, host, port, strings.ToLower(app))
	resp, err := http.Post(base+"/apps/"+app, "application/json", bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		t.Fatalf("register %s in eureka: HTTP %d", app, resp.StatusCode)
	}
}

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
	registerDubbo(t, zkSrv.Addr, "org.example.PriceService", zHost, zPort)
	eHost, ePort := startHTTPServer(t, "from eureka")
	registerEureka(t, eureka.URL, "ORDERS", eHost, ePort)

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
