package model

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
)

// SkipCode is a bounded classification of why an entry was skipped, for metrics.
type SkipCode string

// Why entries are skipped.
const (
	SkipBadHostname SkipCode = "bad_hostname"
	SkipBadAddress  SkipCode = "bad_address"
	SkipBadPort     SkipCode = "bad_port"
	SkipBadLabel    SkipCode = "bad_label"
	SkipConflict    SkipCode = "conflict"
	SkipMalformed   SkipCode = "malformed" // the registry entry could not be parsed at all
)

// Skipped records an entry a watcher or the catalog left out, and why.
type Skipped struct {
	Source   Source   `json:"source"`
	Hostname string   `json:"hostname"`
	Code     SkipCode `json:"code"`
	// ID is the endpoint ID, empty when the whole service was skipped.
	ID     string `json:"id,omitempty"`
	Reason string `json:"reason"`
}

func (s Skipped) String() string {
	if s.ID == "" {
		return fmt.Sprintf("%s service %q: %s", s.Source, s.Hostname, s.Reason)
	}
	return fmt.Sprintf("%s service %q instance %q: %s", s.Source, s.Hostname, s.ID, s.Reason)
}

// A DNS-1123 subdomain, which is what Istio accepts as a ServiceEntry host.
var hostnameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

// ValidHostname reports whether h can be a ServiceEntry host.
func ValidHostname(h string) bool {
	return len(h) <= 253 && hostnameRE.MatchString(h)
}

// Sanitize returns the services with every malformed endpoint removed, and drops services that
// are malformed as a whole (bad host name, no valid port). What it removes is returned with a
// reason; it never fails, so one bad entry cannot take the rest of a registry down with it.
// A service whose endpoints are all invalid is kept with no endpoints: it still exists.
func Sanitize(svcs []Service) ([]Service, []Skipped) {
	out := make([]Service, 0, len(svcs))
	var skipped []Skipped
	for _, svc := range svcs {
		if code, reason := validateService(&svc); reason != "" {
			skipped = append(skipped, Skipped{Source: svc.Source, Hostname: svc.Hostname, Code: code, Reason: reason})
			continue
		}
		eps := svc.Endpoints[:0:0]
		for _, ep := range svc.Endpoints {
			if code, reason := validateEndpoint(&svc, &ep); reason != "" {
				skipped = append(skipped, Skipped{Source: svc.Source, Hostname: svc.Hostname, ID: ep.ID, Code: code, Reason: reason})
				continue
			}
			eps = append(eps, ep)
		}
		svc.Endpoints = eps
		out = append(out, svc)
	}
	return out, skipped
}

func validateService(svc *Service) (SkipCode, string) {
	if !ValidHostname(svc.Hostname) {
		return SkipBadHostname, fmt.Sprintf("host name %q is not a DNS-1123 name (lowercase letters, digits, '-' and '.')", svc.Hostname)
	}
	if len(svc.Ports) == 0 {
		return SkipBadPort, "no port"
	}
	names := make(map[string]bool, len(svc.Ports))
	for _, p := range svc.Ports {
		if p.Number == 0 || p.Number > 65535 {
			return SkipBadPort, fmt.Sprintf("port %q number %d is outside 1-65535", p.Name, p.Number)
		}
		if p.Name == "" || names[p.Name] {
			return SkipBadPort, fmt.Sprintf("port name %q is empty or repeated", p.Name)
		}
		names[p.Name] = true
	}
	return "", ""
}

func validateEndpoint(svc *Service, ep *Endpoint) (SkipCode, string) {
	addr, err := netip.ParseAddr(ep.Address)
	if err != nil {
		return SkipBadAddress, fmt.Sprintf("address %q is not an IP address", ep.Address)
	}
	if addr.IsUnspecified() || addr.IsMulticast() {
		return SkipBadAddress, fmt.Sprintf("address %q cannot be dialled", ep.Address)
	}
	for name, n := range ep.Ports {
		if n == 0 || n > 65535 {
			return SkipBadPort, fmt.Sprintf("port %q number %d is outside 1-65535", name, n)
		}
		if !svc.hasPort(name) {
			return SkipBadPort, fmt.Sprintf("port %q is not a port of the service", name)
		}
	}
	for k := range ep.Labels {
		if strings.TrimSpace(k) == "" {
			return SkipBadLabel, "empty label key"
		}
	}
	return "", ""
}

func (s *Service) hasPort(name string) bool {
	for _, p := range s.Ports {
		if p.Name == name {
			return true
		}
	}
	return false
}
