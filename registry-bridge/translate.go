package bridge

import (
	"fmt"
	"net/netip"
	"strings"

	networking "istio.io/api/networking/v1alpha3"

	"github.com/meshturbo/meshturbo/model"
	"github.com/meshturbo/meshturbo/xds"
)

// TLSModeLabel is the endpoint label with which Istio decides whether to speak mTLS to an
// endpoint: "istio" for a meshed instance; absent for plaintext.
const TLSModeLabel = "security.istio.io/tlsMode"

// TranslateOptions shape the ServiceEntries.
type TranslateOptions struct {
	// Namespace is where the ServiceEntries live in Istio (default "meshturbo-system").
	// They are exported to every namespace.
	Namespace string
	// VIPRange is where services with a non-HTTP port get their address
	// (default DefaultVIPRange).
	VIPRange netip.Prefix
}

// Translate turns every service of the catalog into one ServiceEntry with STATIC resolution.
// Equal catalogs translate to equal resources. It fails only when the VIP range is too small
// for the TCP services; the caller keeps serving what it had.
func Translate(cat *model.Catalog, opts TranslateOptions) ([]xds.Resource, error) {
	ns := opts.Namespace
	if ns == "" {
		ns = "meshturbo-system"
	}
	vipRange := opts.VIPRange
	if !vipRange.IsValid() {
		vipRange = DefaultVIPRange
	}
	var tcpHosts []string
	for i := range cat.Services {
		if needsVIP(&cat.Services[i]) {
			tcpHosts = append(tcpHosts, cat.Services[i].Hostname)
		}
	}
	vips, err := AssignVIPs(tcpHosts, vipRange)
	if err != nil {
		return nil, fmt.Errorf("translate: %w", err)
	}
	out := make([]xds.Resource, 0, len(cat.Services))
	for i := range cat.Services {
		svc := &cat.Services[i]
		se := ServiceEntry(svc)
		if vip, ok := vips[svc.Hostname]; ok {
			se.Addresses = []string{vip}
		}
		resNS := ns
		if svc.Namespace != "" {
			resNS = svc.Namespace
		}
		out = append(out, xds.Resource{
			Namespace: resNS,
			Name:      svc.Hostname,
			Labels:    map[string]string{"app.kubernetes.io/managed-by": "meshturbo", "meshturbo.io/source": string(svc.Source)},
			Spec:      se,
		})
	}
	return out, nil
}

// needsVIP reports whether Envoy must tell the service apart by address: any port whose
// protocol is not routed by host name.
func needsVIP(svc *model.Service) bool {
	for _, p := range svc.Ports {
		if !p.Protocol.IsHTTP() {
			return true
		}
	}
	return false
}

// ServiceEntry translates one service.
func ServiceEntry(svc *model.Service) *networking.ServiceEntry {
	se := &networking.ServiceEntry{
		Hosts:      []string{svc.Hostname},
		Location:   networking.ServiceEntry_MESH_INTERNAL,
		Resolution: networking.ServiceEntry_STATIC,
		ExportTo:   []string{"*"},
	}
	for _, p := range svc.Ports {
		se.Ports = append(se.Ports, &networking.ServicePort{Number: p.Number, Name: p.Name, Protocol: string(p.Protocol)})
	}
	for _, ep := range svc.Endpoints {
		we := &networking.WorkloadEntry{
			Address:  ep.Address,
			Ports:    ep.Ports,
			Labels:   cleanLabels(ep.Labels),
			Locality: ep.Locality,
			Weight:   ep.Weight,
		}
		if ep.Meshed {
			if we.Labels == nil {
				we.Labels = map[string]string{}
			}
			we.Labels[TLSModeLabel] = "istio"
		} else {
			delete(we.Labels, TLSModeLabel)
		}
		se.Endpoints = append(se.Endpoints, we)
	}
	return se
}

// validLabelName reports whether s is a Kubernetes label name (without prefix) or non-empty
// value: ^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$, checked without a regexp (it runs
// for every label of every endpoint on every catalog).
func validLabelName(s string) bool {
	if len(s) == 0 || len(s) > 63 || !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; !isAlnum(c) && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// cleanLabels keeps the labels Kubernetes (and so Istio's validation) accepts and drops the
// rest: registry metadata is free-form, labels are not.
func cleanLabels(in map[string]string) map[string]string {
	if len(in) == 0 {
		return nil
	}
	out := make(map[string]string, len(in))
	for k, v := range in {
		name := k
		if prefix, rest, ok := strings.Cut(k, "/"); ok {
			if len(prefix) > 253 || !model.ValidHostname(prefix) {
				continue
			}
			name = rest
		}
		if validLabelName(name) && (v == "" || validLabelName(v)) {
			out[k] = v
		}
	}
	return out
}
