package eureka

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/model"
)

// A non-mesh client that only reads Eureka finds a mesh service through reverse registration,
// and the watcher never imports it back.
func TestReverseRegistration(t *testing.T) {
	eureka := testenv.StartEureka(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "mesh greeter") })}
	go srv.Serve(lis)
	defer srv.Close()
	port := lis.Addr().(*net.TCPAddr).Port

	r, err := NewRegistrar(RegistrarConfig{URL: eureka.URL, Heartbeat: time.Second, Logger: testenv.Logger(t),
		Services: []MeshService{{App: "greeter", Address: "127.0.0.1", Port: port, Protocol: "http"}}})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			r.Close()
		}
	}()
	api := newEurekaAPI(t, eureka.URL)
	api.register(reg{app: "DB", id: "db1", ip: "10.0.0.9", port: 5432})
	_, snaps := runWatcher(t, Config{URLs: []string{eureka.URL}})

	// The non-mesh client: GET /apps/GREETER, take an UP instance, call it.
	deadline := time.Now().Add(15 * time.Second)
	for {
		addr, err := testenv.EurekaUpInstance(eureka.URL, "GREETER")
		if err == nil {
			resp, err := http.Get("http://" + addr + "/")
			if err == nil {
				b := make([]byte, 64)
				n, _ := resp.Body.Read(b)
				resp.Body.Close()
				if strings.Contains(string(b[:n]), "mesh greeter") {
					break
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the non-mesh client never reached greeter through eureka: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	svcs := snaps.Await(t, 10*time.Second, "db imported", func(s []model.Service) bool { return find(s, "db.eureka") != nil })
	if find(svcs, "greeter.eureka") != nil {
		t.Fatal("the reverse-registered mesh service was imported back into the mesh")
	}

	closed = true
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := testenv.EurekaUpInstance(eureka.URL, "GREETER"); err == nil {
		t.Fatal("greeter still registered after Close")
	}
}
