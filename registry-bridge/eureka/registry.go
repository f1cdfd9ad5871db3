package eureka

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshturbo/meshturbo/model"
)

// Reasons an instance (or, for reasonBadHostname, a service) is left out of a snapshot.
const (
	reasonBadIP        = "bad ip address"
	reasonBadPort      = "port out of range"
	reasonNoPort       = "no enabled port"
	reasonDuplicateID  = "duplicate instance id"
	reasonMixedSchemes = "mixed secure and non-secure ports"
	reasonBadHostname  = "invalid host name"
)

// skipCode classifies a reason for metrics.
func skipCode(reason string) model.SkipCode {
	switch reason {
	case reasonBadIP:
		return model.SkipBadAddress
	case reasonBadPort, reasonNoPort:
		return model.SkipBadPort
	case reasonBadHostname:
		return model.SkipBadHostname
	default: // reasonDuplicateID, reasonMixedSchemes
		return model.SkipConflict
	}
}

// registry is the watcher's copy of Eureka's registry: every instance of every status, as
// Eureka's own clients keep it, so that its hash code can be compared with the server's. It
// is never changed in place: apply returns a new one sharing the untouched apps.
type registry struct {
	apps map[string]map[string]*instance // upper-case app name → instance ID → instance
	hash *string                         // hashCode, once computed: the registry never changes
}

func newRegistry(doc *document) *registry {
	return &registry{apps: doc.Apps}
}

// apply returns the registry with a delta applied: ADDED and MODIFIED instances are put,
// DELETED ones removed, other actions ignored (as Eureka's DiscoveryClient does).
func (r *registry) apply(delta *document) *registry {
	next := &registry{apps: maps.Clone(r.apps)}
	if next.apps == nil {
		next.apps = map[string]map[string]*instance{}
	}
	for app, insts := range delta.Apps {
		byID := maps.Clone(next.apps[app])
		if byID == nil {
			byID = map[string]*instance{}
		}
		for id, in := range insts {
			switch in.Action {
			case actionAdded, actionModified:
				byID[id] = in
			case actionDeleted:
				delete(byID, id)
			}
		}
		if len(byID) == 0 {
			delete(next.apps, app)
		} else {
			next.apps[app] = byID
		}
	}
	return next
}

// changedBy reports whether applying delta would change the registry. Eureka's deltas are
// not "since your last fetch" but "the last 3 minutes" (retention-time-in-m-s-in-delta-queue):
// each poll gets the same recent changes again, and at 100,000 instances rebuilding the
// snapshot for nothing would cost a third of a core.
func (r *registry) changedBy(delta *document) bool {
	for app, insts := range delta.Apps {
		have := r.apps[app]
		for id, in := range insts {
			old, ok := have[id]
			switch in.Action {
			case actionAdded, actionModified:
				if !ok || !old.same(in) {
					return true
				}
			case actionDeleted:
				if ok {
					return true
				}
			}
		}
	}
	return false
}

// same reports whether two instances are the same, but for the delta action.
func (a *instance) same(b *instance) bool {
	return a.App == b.App && a.ID == b.ID && a.IPAddr == b.IPAddr && a.Status == b.Status &&
		a.Port == b.Port && a.SecurePort == b.SecurePort && a.Dupes == b.Dupes && maps.Equal(a.Metadata, b.Metadata)
}

// hashCode is Eureka's Applications.getReconcileHashCode: the count of instances per status,
// statuses in lexical order, each written as STATUS_count_, e.g. "DOWN_1_UP_3_". An empty
// registry hashes to "".
func (r *registry) hashCode() string {
	if r.hash == nil {
		h := r.computeHash()
		r.hash = &h
	}
	return *r.hash
}

func (r *registry) computeHash() string {
	counts := map[string]int{}
	for _, insts := range r.apps {
		for _, in := range insts {
			counts[in.Status]++
		}
	}
	var b strings.Builder
	for _, status := range slices.Sorted(maps.Keys(counts)) {
		b.WriteString(status)
		b.WriteByte('_')
		b.WriteString(strconv.Itoa(counts[status]))
		b.WriteByte('_')
	}
	return b.String()
}

// mapping holds the settings that turn instances into services.
type mapping struct {
	domain        string
	meshedMetaKey string
}

// endpoint is an instance that can be served, with the port chosen for it.
type endpoint struct {
	in     *instance
	port   uint32
	secure bool
	proto  model.Protocol
}

// services turns the registry into one service per app, UP instances only, and lists what
// it left out and why. The result is sorted by host name and normalized.
func (r *registry) services(m mapping) ([]model.Service, []model.Skipped) {
	var out []model.Service
	var skipped []model.Skipped
	skip := func(host, id, reason string) {
		skipped = append(skipped, model.Skipped{Source: model.SourceEureka, Hostname: host, ID: id, Code: skipCode(reason), Reason: reason})
	}
	for _, app := range slices.Sorted(maps.Keys(r.apps)) {
		insts := r.apps[app]
		host := asciiLower(app) + "." + m.domain
		var up, usable []endpoint
		for _, id := range slices.Sorted(maps.Keys(insts)) {
			in := insts[id]
			if in.Metadata[ReverseMetaKey] == "true" {
				continue // a mesh service meshturbo registered: never imported back
			}
			ep, reason := m.endpoint(in)
			if in.Status == statusUp {
				for range in.Dupes {
					skip(host, id, reasonDuplicateID)
				}
				if reason != "" {
					skip(host, id, reason)
				}
			}
			if reason != "" {
				continue
			}
			usable = append(usable, ep)
			if in.Status == statusUp {
				up = append(up, ep)
			}
		}
		if !model.ValidHostname(host) {
			if len(up) > 0 {
				skip(host, "", reasonBadHostname)
			}
			continue
		}
		// The port comes from the UP instances; an app with none keeps its service (with no
		// endpoints, so callers get "no healthy upstream"), its port from the others.
		base := up
		if len(base) == 0 {
			base = usable
		}
		if len(base) == 0 {
			continue
		}
		secure := majoritySecure(base)
		base = slices.DeleteFunc(slices.Clone(base), func(e endpoint) bool { return e.secure != secure })
		proto := mostCommon(base, func(e endpoint) model.Protocol { return e.proto })
		port := mostCommon(base, func(e endpoint) uint32 { return e.port })
		name := strings.ToLower(string(proto))
		svc := model.Service{
			Hostname: host,
			Source:   model.SourceEureka,
			Ports:    []model.Port{{Name: name, Number: port, Protocol: proto}},
		}
		for _, e := range up {
			if e.secure != secure {
				skip(host, e.in.ID, reasonMixedSchemes)
				continue
			}
			svc.Endpoints = append(svc.Endpoints, model.Endpoint{
				ID:       e.in.ID,
				Address:  e.in.IPAddr,
				Ports:    map[string]uint32{name: e.port},
				Labels:   labels(e.in.Metadata),
				Locality: e.in.Metadata["locality"],
				Meshed:   e.in.Metadata[m.meshedMetaKey] == "true",
			})
		}
		svc.Normalize()
		out = append(out, svc)
	}
	return out, skipped
}

// endpoint checks one instance and chooses its port: the non-secure port when it is enabled,
// else the secure port when that is enabled. It returns a reason when the instance cannot be
// served.
func (m mapping) endpoint(in *instance) (endpoint, string) {
	addr, err := netip.ParseAddr(in.IPAddr)
	if err != nil || addr.Zone() != "" || addr.IsUnspecified() || addr.IsMulticast() {
		return endpoint{}, reasonBadIP
	}
	// Eureka's defaults: the non-secure port is enabled unless it says otherwise, the
	// secure one is not.
	plainOn := in.Port.Present && (!in.Port.EnabledSet || in.Port.Enabled)
	secureOn := in.SecurePort.Present && in.SecurePort.EnabledSet && in.SecurePort.Enabled
	var ps portSpec
	switch {
	case plainOn:
		ps = in.Port
	case secureOn:
		ps = in.SecurePort
	default:
		return endpoint{}, reasonNoPort
	}
	if ps.Number < 1 || ps.Number > 65535 {
		return endpoint{}, reasonBadPort
	}
	e := endpoint{in: in, port: uint32(ps.Number), secure: !plainOn}
	e.proto = protocol(in.Metadata["protocol"], e.secure)
	return e, ""
}

// protocol maps the "protocol" metadata to an Istio protocol. A non-secure port without it is
// HTTP (what Eureka's REST clients speak). A secure port carries TLS that Envoy cannot look
// into: HTTPS, or TLS when the metadata names a protocol that is not HTTP-based.
func protocol(meta string, secure bool) model.Protocol {
	if strings.TrimSpace(meta) == "" {
		if secure {
			return model.ProtocolHTTPS
		}
		return model.ProtocolHTTP
	}
	p := model.ParseProtocol(meta)
	if !secure {
		return p
	}
	if p.IsHTTP() || p == model.ProtocolHTTPS {
		return model.ProtocolHTTPS
	}
	return model.ProtocolTLS
}

// majoritySecure reports whether most endpoints use their secure port (ties: not).
func majoritySecure(eps []endpoint) bool {
	n := 0
	for _, e := range eps {
		if e.secure {
			n++
		}
	}
	return 2*n > len(eps)
}

// mostCommon returns the value most endpoints have; ties go to the lowest value.
func mostCommon[T cmp.Ordered](eps []endpoint, key func(endpoint) T) T {
	counts := map[T]int{}
	for _, e := range eps {
		counts[key(e)]++
	}
	var best T
	bestN := 0
	for v, n := range counts {
		if n > bestN || (n == bestN && v < best) {
			best, bestN = v, n
		}
	}
	return best
}

// asciiLower lowers A-Z only. Unicode case mapping could turn two app names into one host
// name (the Kelvin sign lowers to "k"); left alone, non-ASCII fails host name validation.
func asciiLower(s string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + ('a' - 'A')
		}
		return r
	}, s)
}

// labels are the instance metadata (decodeMetadata already dropped "@class" and empty keys).
func labels(meta map[string]string) map[string]string {
	if len(meta) == 0 {
		return nil
	}
	return maps.Clone(meta)
}

// countReasons tallies skipped entries and unreadable ones by reason.
func countReasons(skipped []model.Skipped, unreadable map[string]int) map[string]int {
	out := map[string]int{}
	for _, s := range skipped {
		out[s.Reason]++
	}
	for r, n := range unreadable {
		out[r] += n
	}
	return out
}
