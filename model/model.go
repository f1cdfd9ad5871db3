// Package model is meshturbo's registry-neutral service catalog: the services that registry
// watchers publish, their validation, and the merged, deterministic Catalog that the xDS server
// translates. It does no I/O.
package model

import (
	"cmp"
	"maps"
	"slices"
	"strings"
)

// Source names the registry a service came from.
type Source string

// The registries meshturbo bridges.
const (
	SourceConsul    Source = "consul"
	SourceZooKeeper Source = "zookeeper"
	SourceEureka    Source = "eureka"
)

// Protocol is an Istio port protocol name.
type Protocol string

// Protocols as Istio names them.
const (
	ProtocolHTTP  Protocol = "HTTP"
	ProtocolHTTP2 Protocol = "HTTP2"
	ProtocolGRPC  Protocol = "GRPC"
	ProtocolTCP   Protocol = "TCP"
	ProtocolTLS   Protocol = "TLS"
	ProtocolHTTPS Protocol = "HTTPS"
)

// ParseProtocol maps a registry's protocol spelling ("http", "h2c", "grpc", …) to an Istio
// protocol. Unknown or empty spellings are TCP, which is what Istio assumes for an unnamed port.
func ParseProtocol(s string) Protocol {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "http", "http1", "http/1.1":
		return ProtocolHTTP
	case "http2", "h2", "h2c":
		return ProtocolHTTP2
	case "grpc", "grpc-web":
		return ProtocolGRPC
	case "https":
		return ProtocolHTTPS
	case "tls":
		return ProtocolTLS
	default:
		return ProtocolTCP
	}
}

// IsHTTP reports whether Envoy routes the protocol by host name rather than by address.
func (p Protocol) IsHTTP() bool {
	return p == ProtocolHTTP || p == ProtocolHTTP2 || p == ProtocolGRPC
}

// Port is a service port as callers address it.
type Port struct {
	Name     string
	Number   uint32
	Protocol Protocol
}

// Endpoint is one instance of a service.
type Endpoint struct {
	// ID is the instance's identity in its registry (Consul service ID, Eureka instance ID, …).
	ID      string
	Address string
	// Ports maps a service port name to the port this instance listens on.
	Ports    map[string]uint32
	Labels   map[string]string
	Locality string
	Weight   uint32
	// Meshed is true when the instance runs a sidecar and so speaks Istio mTLS.
	Meshed bool
}

// Service is one service as one registry describes it.
type Service struct {
	// Hostname is the name mesh callers use, e.g. "orders.service.consul".
	Hostname  string
	Namespace string
	Source    Source
	Ports     []Port
	Endpoints []Endpoint
	Labels    map[string]string
}

// Key identifies a service across sources.
func (s *Service) Key() string { return s.Hostname }

// Normalize sorts ports and endpoints so that equal services compare equal.
func (s *Service) Normalize() {
	slices.SortFunc(s.Ports, func(a, b Port) int {
		return cmp.Or(cmp.Compare(a.Number, b.Number), cmp.Compare(a.Name, b.Name))
	})
	slices.SortFunc(s.Endpoints, func(a, b Endpoint) int {
		return cmp.Or(cmp.Compare(a.Address, b.Address), cmp.Compare(a.ID, b.ID))
	})
}

// Equal reports whether two services hold the same content.
func (s *Service) Equal(o *Service) bool {
	if s.Hostname != o.Hostname || s.Namespace != o.Namespace || s.Source != o.Source ||
		!slices.Equal(s.Ports, o.Ports) || !maps.Equal(s.Labels, o.Labels) ||
		len(s.Endpoints) != len(o.Endpoints) {
		return false
	}
	for i := range s.Endpoints {
		a, b := &s.Endpoints[i], &o.Endpoints[i]
		if a.ID != b.ID || a.Address != b.Address || a.Locality != b.Locality || a.Weight != b.Weight ||
			a.Meshed != b.Meshed || !maps.Equal(a.Ports, b.Ports) || !maps.Equal(a.Labels, b.Labels) {
			return false
		}
	}
	return true
}
