package hotupgrade

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/xds"
)

func TestBootstrapNodeAndValidation(t *testing.T) {
	b := SidecarBootstrap{IstiodAddr: "127.0.0.1:15010", AdminAddr: "127.0.0.1:15000", IP: "10.1.2.3",
		PodName: "orders-1", Namespace: "shop", InterceptionMode: "NONE", SDSSocket: "/tmp/sds.sock", Labels: map[string]string{"app": "orders"}}
	raw, err := b.JSON()
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Node struct {
			ID       string         `json:"id"`
			Metadata map[string]any `json:"metadata"`
		} `json:"node"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if want := "sidecar~10.1.2.3~orders-1.shop~shop.svc.cluster.local"; doc.Node.ID != want {
		t.Errorf("node id = %q, want %q", doc.Node.ID, want)
	}
	if doc.Node.Metadata["INTERCEPTION_MODE"] != "NONE" || doc.Node.Metadata["NAMESPACE"] != "shop" {
		t.Errorf("metadata = %v", doc.Node.Metadata)
	}

	bad := SidecarBootstrap{IstiodAddr: "nohostport", AdminAddr: "127.0.0.1:1", IP: "not-an-ip", InterceptionMode: "TPROXY"}
	_, err = bad.JSON()
	for _, want := range []string{"IstiodAddr", "not an IP address", "PodName", "SDSSocket", "TPROXY"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not name %q", err, want)
		}
	}
}

func freeAddr(t testing.TB) string {
	return fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
}

// startControlPlane stands in for istiod: Envoy asks it for clusters and listeners and gets
// empty answers, which is enough for it to become LIVE.
func startControlPlane(t *testing.T) string {
	srv, err := xds.New(xds.Config{Addr: "127.0.0.1:0", Store: xds.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv.Addr()
}

func TestManagerRunsEnvoyUntilClosed(t *testing.T) {
	deps := testenv.RequireDeps(t)
	admin := freeAddr(t)
	bs, err := SidecarBootstrap{IstiodAddr: startControlPlane(t), AdminAddr: admin, IP: "127.0.0.1",
		PodName: "p", Namespace: "default", SDSSocket: filepath.Join(t.TempDir(), "sds.sock")}.JSON()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m, err := New(ctx, Config{Envoy: deps.Envoy, Bootstrap: bs, AdminAddr: admin, Output: testenv.Writer(t),
		ExtraArgs: []string{"--concurrency", "1"}})
	if err != nil {
		t.Fatal(err)
	}
	st := m.Status()
	if st.Phase != "serving" || st.Version != deps.EnvoyVersion || st.PID == 0 {
		t.Fatalf("status = %+v, want serving %s", st, deps.EnvoyVersion)
	}
	if err := syscall.Kill(st.PID, 0); err != nil {
		t.Fatalf("envoy %d is gone: %v", st.PID, err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Exited():
	default:
		t.Fatal("envoy still running after Close")
	}
	if c, err := net.DialTimeout("tcp", admin, 200*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("envoy admin still accepting after Close")
	}
}

func TestManagerReportsEnvoyThatCannotStart(t *testing.T) {
	deps := testenv.RequireDeps(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := freeAddr(t)
	_, err := New(ctx, Config{Envoy: deps.Envoy, Bootstrap: []byte(`{"static_resources": {"clusters": [{"name": 7}]}}`),
		AdminAddr: admin, Output: testenv.Writer(t)})
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("err = %v, want an exit-before-ready error", err)
	}
	_, err = New(ctx, Config{Envoy: "/nonexistent/envoy", Bootstrap: []byte("{}"), AdminAddr: admin})
	if err == nil || !strings.Contains(err.Error(), "make deps") {
		t.Fatalf("err = %v, want a hint to run make deps", err)
	}
}
