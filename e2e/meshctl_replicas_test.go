package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	mcp "istio.io/api/mcp/v1alpha1"

	"github.com/meshturbo/meshturbo/internal/testenv"
	"github.com/meshturbo/meshturbo/xds"
)

// served is what one meshturbo-xds serves for ServiceEntries: the type's version and each
// resource's name → version.
type served struct {
	Version   string            `json:"version"`
	Resources map[string]string `json:"resources"`
}

// adminServed reads GET /v1/xds/serviceentries.
func adminServed(addr string) (served, error) {
	var s served
	resp, err := http.Get("http://" + addr + "/v1/xds/serviceentries")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return s, err
	}
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("%s: %s", resp.Status, b)
	}
	return s, json.Unmarshal(b, &s)
}

// adsServed asks meshturbo-xds for ServiceEntries over ADS, as istiod does, and returns the
// response's version and each MCP resource's name → version.
func adsServed(ctx context.Context, addr string) (served, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return served{}, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return served{}, fmt.Errorf("ads stream to %s: %w", addr, err)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: "replica-check"}, TypeUrl: xds.TypeServiceEntry}); err != nil {
		return served{}, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return served{}, fmt.Errorf("ads response from %s: %w", addr, err)
	}
	s := served{Version: resp.GetVersionInfo(), Resources: map[string]string{}}
	for _, a := range resp.GetResources() {
		var r mcp.Resource
		if err := a.UnmarshalTo(&r); err != nil {
			return served{}, fmt.Errorf("resource of %s: %w", addr, err)
		}
		s.Resources[r.GetMetadata().GetName()] = r.GetMetadata().GetVersion()
	}
	return s, nil
}

// TestTwoXDSReplicasServeIdenticalVersions runs two meshturbo-xds against one Consul, as the
// Deployment's two replicas run, and checks that both serve the same ServiceEntries with the
// same versions — over ADS as istiod sees them and on the admin API — so istiod can move from
// one to the other without a change of versions (and so without a push). TCP services are
// included: their VIPs come from a range and must be allocated alike.
func TestTwoXDSReplicasServeIdenticalVersions(t *testing.T) {
	testenv.RequireDeps(t)
	consul := testenv.StartConsul(t)
	cc := consulClient(t, consul.HTTPAddr)
	reg := func(id, name, addr, proto string) {
		t.Helper()
		if err := cc.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: name, Address: addr, Port: 9000,
			Meta: map[string]string{"protocol": proto}}); err != nil {
			t.Fatalf("register %s in consul: %v", id, err)
		}
	}
	for i := range 6 {
		proto := "http"
		if i%2 == 1 {
			proto = "tcp" // gets a VIP
		}
		for j := range 2 {
			reg(fmt.Sprintf("svc%d-%d", i, j), fmt.Sprintf("svc%d", i), fmt.Sprintf("127.0.1.%d", 10*i+j+1), proto)
		}
	}

	a := startXDS(t, consul.HTTPAddr)
	b := startXDS(t, consul.HTTPAddr)

	// identical reports whether both replicas serve want services, identically on both paths.
	identical := func(want int) (served, error) {
		var views []served
		for _, d := range []*xdsDaemon{a, b} {
			adm, err := adminServed(d.AdminAddr)
			if err != nil {
				return served{}, err
			}
			ads, err := adsServed(context.Background(), d.MCPAddr)
			if err != nil {
				return served{}, err
			}
			if len(ads.Resources) != want {
				return served{}, fmt.Errorf("meshturbo-xds at %s serves %d ServiceEntries, want %d", d.MCPAddr, len(ads.Resources), want)
			}
			if ads.Version != adm.Version || !maps.Equal(ads.Resources, adm.Resources) {
				return served{}, fmt.Errorf("meshturbo-xds at %s: ADS %v and admin %v disagree", d.MCPAddr, ads, adm)
			}
			views = append(views, ads)
		}
		if views[0].Version != views[1].Version || !maps.Equal(views[0].Resources, views[1].Resources) {
			return served{}, fmt.Errorf("replicas differ:\n  %s: %v\n  %s: %v", a.MCPAddr, views[0], b.MCPAddr, views[1])
		}
		return views[0], nil
	}
	var first served
	awaitCondition(t, 30*time.Second, "both replicas serve the 6 services identically", func() (err error) {
		first, err = identical(6)
		return err
	})

	// A change reaches both, and both version it alike: the changed resource gets a new
	// version, the others keep theirs.
	reg("svc0-2", "svc0", "127.0.1.3", "http")
	var second served
	awaitCondition(t, 30*time.Second, "both replicas serve the new svc0 instance identically", func() (err error) {
		if second, err = identical(6); err != nil {
			return err
		}
		if second.Version == first.Version {
			return fmt.Errorf("version still %s", first.Version)
		}
		return nil
	})
	changed := 0
	for name, v := range second.Resources {
		if first.Resources[name] != v {
			changed++
		}
	}
	if changed != 1 {
		t.Errorf("%d resources changed version for one new instance, want 1:\n  before %v\n  after  %v", changed, first.Resources, second.Resources)
	}
}
