package lazyload

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"

	networking "istio.io/api/networking/v1alpha3"

	"github.com/meshturbo/meshturbo/model"
	"github.com/meshturbo/meshturbo/xds"
)

// tlsModeLabel makes Istio speak mTLS to the fallback, so the fallback sees each caller's
// SPIFFE identity.
const tlsModeLabel = "security.istio.io/tlsMode"

// Workload is one workload whose sidecar is narrowed to what it calls.
type Workload struct {
	Namespace string
	Name      string
	// Selector picks the workload's proxies (Istio workloadSelector labels).
	Selector map[string]string
	// ServiceAccount is the identity its sidecar presents (default: Name); the fallback
	// recognises the caller by it.
	ServiceAccount string
	// Dependencies are declared edges, "host" or "host:port"; they never expire.
	Dependencies []string
}

// ID is "<namespace>/<name>".
func (w *Workload) ID() string { return w.Namespace + "/" + w.Name }

// Fallback describes the fallback proxy as the mesh sees it.
type Fallback struct {
	// Host is the fallback's host name in the mesh (default meshturbo-fallback.meshturbo.internal).
	Host string
	// Address is the IP the fallback Envoy listens on. Required.
	Address string
	// HTTPPort receives every HTTP, HTTP/2 and gRPC call a scoped sidecar does not know
	// (Istio's egress proxy). Default 15081.
	HTTPPort uint32
	// Namespace holds the fallback's ServiceEntries (default meshturbo-system).
	Namespace string
	// ServiceAccount is the fallback's identity (default meshturbo-fallback).
	ServiceAccount string
}

func (f *Fallback) defaults() {
	if f.Host == "" {
		f.Host = "meshturbo-fallback.meshturbo.internal"
	}
	if f.HTTPPort == 0 {
		f.HTTPPort = 15081
	}
	if f.Namespace == "" {
		f.Namespace = "meshturbo-system"
	}
	if f.ServiceAccount == "" {
		f.ServiceAccount = "meshturbo-fallback"
	}
}

// portHost names the stand-in service that keeps a listener on port p in a scoped sidecar.
func (f *Fallback) portHost(p uint32) string { return "port-" + strconv.Itoa(int(p)) + "." + f.Host }

// meshPort is one port some service of the catalog uses, with the protocol callers speak on it.
type meshPort struct {
	Number   uint32
	Protocol model.Protocol
}

// meshPorts lists the ports of the catalog. Where services disagree on a port's protocol,
// the first by host name wins, as Istio's own listener conflict resolution would do.
func meshPorts(cat *model.Catalog) []meshPort {
	seen := map[uint32]model.Protocol{}
	for i := range cat.Services {
		for _, p := range cat.Services[i].Ports {
			if _, ok := seen[p.Number]; !ok {
				seen[p.Number] = p.Protocol
			}
		}
	}
	out := make([]meshPort, 0, len(seen))
	for n, p := range seen {
		out = append(out, meshPort{Number: n, Protocol: p})
	}
	slices.SortFunc(out, func(a, b meshPort) int { return cmp.Compare(a.Number, b.Number) })
	return out
}

// FallbackServiceEntries are the ServiceEntries that make the fallback reachable from scoped
// sidecars: the fallback itself (the egress proxy for unknown HTTP traffic) and one stand-in
// per mesh port, which a scoped sidecar holds while no service it calls uses that port. The
// stand-in keeps a listener on the port (so an unknown HTTP host still reaches the catch-all
// route and the egress proxy), and for a TCP port it forwards the connection to the fallback,
// which knows the service behind that port.
func FallbackServiceEntries(cat *model.Catalog, fb Fallback, trustDomain string) []xds.Resource {
	fb.defaults()
	san := spiffeID(trustDomain, fb.Namespace, fb.ServiceAccount)
	labels := map[string]string{"app.kubernetes.io/managed-by": "meshturbo", "meshturbo.io/role": "lazyload-fallback"}
	endpoint := func(ports map[string]uint32) []*networking.WorkloadEntry {
		return []*networking.WorkloadEntry{{
			Address: fb.Address, Ports: ports, Labels: map[string]string{tlsModeLabel: "istio"},
			ServiceAccount: fb.ServiceAccount,
		}}
	}
	out := []xds.Resource{{
		Namespace: fb.Namespace, Name: fb.Host, Labels: labels,
		Spec: &networking.ServiceEntry{
			Hosts:           []string{fb.Host},
			Location:        networking.ServiceEntry_MESH_INTERNAL,
			Resolution:      networking.ServiceEntry_STATIC,
			ExportTo:        []string{"*"},
			SubjectAltNames: []string{san},
			// HTTP2 to the fallback carries HTTP/1, HTTP/2 and gRPC callers alike.
			Ports:     []*networking.ServicePort{{Number: fb.HTTPPort, Name: "http2-fallback", Protocol: string(model.ProtocolHTTP2)}},
			Endpoints: endpoint(nil),
		},
	}}
	for _, mp := range meshPorts(cat) {
		name := strings.ToLower(string(mp.Protocol)) + "-" + strconv.Itoa(int(mp.Number))
		target := mp.Number // a TCP port: the fallback listens on the same port
		if mp.Protocol.IsHTTP() {
			target = fb.HTTPPort
		}
		out = append(out, xds.Resource{
			Namespace: fb.Namespace, Name: fb.portHost(mp.Number), Labels: labels,
			Spec: &networking.ServiceEntry{
				Hosts:           []string{fb.portHost(mp.Number)},
				Location:        networking.ServiceEntry_MESH_INTERNAL,
				Resolution:      networking.ServiceEntry_STATIC,
				ExportTo:        []string{"*"},
				SubjectAltNames: []string{san},
				Ports:           []*networking.ServicePort{{Number: mp.Number, Name: name, Protocol: string(mp.Protocol)}},
				Endpoints:       endpoint(map[string]uint32{name: target}),
			},
		})
	}
	return out
}

// Scope is the served view of one workload.
type Scope struct {
	Workload  string            `json:"workload"`
	Namespace string            `json:"namespace"`
	Selector  map[string]string `json:"selector"`
	// Hosts are the Sidecar's egress hosts.
	Hosts []string `json:"hosts"`
	// Services counts the bridged services in Hosts (not the fallback's stand-ins).
	Services int    `json:"services"`
	Version  string `json:"version"`
	// FallbackHits counts calls of this workload that went through the fallback.
	FallbackHits uint64 `json:"fallbackHits"`
}

// catalogIndex is what every workload's scope needs from a catalog, built once per publish,
// so that a scope costs as much as the workload's edges, not as the catalog's size.
type catalogIndex struct {
	ports  []meshPort
	byHost map[string]*model.Service
}

func indexCatalog(cat *model.Catalog) *catalogIndex {
	idx := &catalogIndex{ports: meshPorts(cat), byHost: make(map[string]*model.Service, len(cat.Services))}
	for i := range cat.Services {
		idx.byHost[cat.Services[i].Hostname] = &cat.Services[i]
	}
	return idx
}

// scopeHosts computes the egress hosts of w: the fallback, every host w has an edge to, the
// port stand-ins for mesh ports none of those hosts use, and the always-included hosts.
func scopeHosts(w *Workload, edges []Edge, cat *catalogIndex, fb Fallback, always []string) (hosts []string, services int) {
	fb.defaults()
	covered := map[uint32]bool{}
	set := map[string]bool{"*/" + fb.Host: true}
	for _, e := range edges {
		if set["*/"+e.Host] {
			continue // another port of a host already counted
		}
		set["*/"+e.Host] = true // a host that left the catalog stays harmlessly until its edge expires
		svc, ok := cat.byHost[e.Host]
		if !ok {
			continue
		}
		services++
		for _, p := range svc.Ports {
			covered[p.Number] = true
		}
	}
	for _, mp := range cat.ports {
		if !covered[mp.Number] {
			set["*/"+fb.portHost(mp.Number)] = true
		}
	}
	for _, h := range always {
		set[h] = true
	}
	hosts = make([]string, 0, len(set))
	for h := range set {
		hosts = append(hosts, h)
	}
	slices.Sort(hosts)
	return hosts, services
}

// sidecarName is the name of the Sidecar resource meshturbo serves for w.
func sidecarName(w *Workload) string { return "meshturbo-lazyload-" + w.Name }

// sidecar builds the Istio Sidecar of w.
func sidecar(w *Workload, hosts []string, fb Fallback) xds.Resource {
	fb.defaults()
	return xds.Resource{
		Namespace: w.Namespace,
		Name:      sidecarName(w),
		Labels:    map[string]string{"app.kubernetes.io/managed-by": "meshturbo", "meshturbo.io/role": "lazyload-scope"},
		Spec: &networking.Sidecar{
			WorkloadSelector: &networking.WorkloadSelector{Labels: w.Selector},
			Egress:           []*networking.IstioEgressListener{{Hosts: hosts}},
			OutboundTrafficPolicy: &networking.OutboundTrafficPolicy{
				Mode:        networking.OutboundTrafficPolicy_ALLOW_ANY,
				EgressProxy: &networking.Destination{Host: fb.Host, Port: &networking.PortSelector{Number: fb.HTTPPort}},
			},
		},
	}
}

func spiffeID(trustDomain, namespace, serviceAccount string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, namespace, serviceAccount)
}
