package consul

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

// A non-mesh caller that only reads Consul finds a mesh service through reverse registration,
// only while it is healthy, and the watcher never imports it back.
func TestReverseRegistration(t *testing.T) {
	consul := testenv.StartConsul(t)
	c := agentClient(t, consul.HTTPAddr)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "mesh greeter") })}
	go srv.Serve(lis)
	defer srv.Close()
	port := lis.Addr().(*net.TCPAddr).Port

	reg, err := NewRegistrar(RegistrarConfig{
		Address: consul.HTTPAddr, CheckInterval: 200 * time.Millisecond, Retry: 200 * time.Millisecond,
		Logger:   testenv.Logger(t),
		Services: []MeshService{{Name: "greeter", Address: "127.0.0.1", Port: port, Protocol: "http"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			reg.Close()
		}
	}()
	snaps := runWatcher(t, consul.HTTPAddr, testenv.Logger(t))
	// Another service so the watcher has something to publish.
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "db-1", Name: "db", Address: "10.0.0.9", Port: 5432}); err != nil {
		t.Fatal(err)
	}

	// The non-mesh caller: asks Consul for passing greeter instances and calls one.
	deadline := time.Now().Add(10 * time.Second)
	var body string
	for {
		entries, _, err := c.Health().Service("greeter", "", true, nil)
		if err == nil && len(entries) == 1 {
			e := entries[0].Service
			resp, err := http.Get(fmt.Sprintf("http://%s:%d/", e.Address, e.Port))
			if err == nil {
				b := make([]byte, 64)
				n, _ := resp.Body.Read(b)
				resp.Body.Close()
				body = string(b[:n])
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("greeter never became a passing instance in consul (last err %v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(body, "mesh greeter") {
		t.Fatalf("non-mesh caller got %q", body)
	}

	svcs := snaps.Await(t, 10*time.Second, "db imported", func(s []model.Service) bool { return find(s, "db.service.consul") != nil })
	if find(svcs, "greeter.service.consul") != nil {
		t.Fatal("the reverse-registered mesh service was imported back into the mesh")
	}

	closed = true
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	entries, _, err := c.Health().Service("greeter", "", false, nil)
	if err != nil || len(entries) != 0 {
		t.Fatalf("after Close greeter still registered: %v %v", entries, err)
	}
}

func TestRegistrarValidation(t *testing.T) {
	_, err := NewRegistrar(RegistrarConfig{Address: "127.0.0.1:1", Services: []MeshService{{Name: "x", Address: "host", Port: 0}}})
	if err == nil || !strings.Contains(err.Error(), "services[0]") {
		t.Fatalf("err = %v, want one naming services[0]", err)
	}
}
