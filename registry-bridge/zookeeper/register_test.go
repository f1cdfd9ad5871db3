package zookeeper

import (
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

// A non-mesh Dubbo consumer, which lists providers in ZooKeeper, finds a mesh service through
// reverse registration; the watcher never imports it back, and Close removes it.
func TestReverseRegistration(t *testing.T) {
	zkSrv := testenv.StartZooKeeper(t)
	r, err := NewRegistrar(RegistrarConfig{Servers: []string{zkSrv.Addr}, Check: 200 * time.Millisecond, Logger: testenv.Logger(t),
		Services: []MeshService{{Interface: "org.mesh.GreeterService", Protocol: "tri", Address: "10.0.0.7", Port: 50051,
			Params: map[string]string{"version": "1.0.0"}}}})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			r.Close()
		}
	}()
	admin := dial(t, zkSrv.Addr)
	if err := testenv.DubboProvider(zkSrv.Addr, "org.other.DbService", "dubbo", "10.0.0.9", 20880, false); err != nil {
		t.Fatal(err)
	}
	_, rec, _ := startWatcher(t, Config{Servers: []string{zkSrv.Addr}})

	// The consumer's view: the providers of the interface.
	providers := func() []string {
		kids, _, err := admin.Children("/dubbo/org.mesh.GreeterService/providers")
		if err != nil {
			return nil
		}
		return kids
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(providers()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("greeter never appeared as a Dubbo provider")
		}
		time.Sleep(50 * time.Millisecond)
	}
	u, err := url.QueryUnescape(providers()[0])
	if err != nil || !strings.HasPrefix(u, "tri://10.0.0.7:50051/org.mesh.GreeterService?") || !strings.Contains(u, "version=1.0.0") {
		t.Fatalf("provider URL = %q (%v)", u, err)
	}
	if _, err := ParseDubboURL(u); err != nil {
		t.Fatalf("our provider URL does not parse: %v", err)
	}

	rec.wait(t, 10*time.Second, func(s []model.Service) error {
		hosts := map[string]bool{}
		for _, svc := range s {
			hosts[svc.Hostname] = true
		}
		if !hosts["org.other.dbservice.dubbo"] {
			return fmt.Errorf("db not imported yet: %v", hosts)
		}
		for h := range hosts {
			if strings.Contains(h, "greeter") {
				return fmt.Errorf("the reverse-registered greeter was imported back: %v", hosts)
			}
		}
		return nil
	})

	closed = true
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if kids := providers(); len(kids) != 0 {
		t.Fatalf("providers after Close: %v", kids)
	}
}
