package zookeeper

import (
	"cmp"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/meshturbo/meshturbo/model"
)

// Skip reasons: the keys of Stats. Each names why a znode is not served.
const (
	ReasonBadEncoding   = "bad-encoding"   // a provider node name that is not valid percent-encoding
	ReasonBadURL        = "bad-url"        // a provider URL that cannot be parsed
	ReasonBadHost       = "bad-host"       // a host that is not a dialable IP address (host names included)
	ReasonBadPort       = "bad-port"       // a port missing or outside 1-65535
	ReasonBadJSON       = "bad-json"       // Curator instance data that is not the expected JSON
	ReasonOversized     = "oversized"      // node data above Config.MaxNodeData, or a URL above MaxDubboURLLen
	ReasonBadName       = "bad-name"       // no DNS-1123 host name can be made for the service
	ReasonDuplicate     = "duplicate"      // a second instance with the same ID or address:port in one service
	ReasonDisabled      = "disabled"       // switched off: enabled=false, disabled=true, instance_status not UP
	ReasonNotProvider   = "not-provider"   // a URL under providers/ whose side is not "provider"
	ReasonOwn           = "own"            // a mesh service meshturbo registered (see Registrar): never imported back
	ReasonOtherProtocol = "other-protocol" // a provider whose protocol is not the one its service was given
	ReasonHostCollision = "host-collision" // its service's host name is taken by another service
	ReasonUnreadable    = "unreadable"     // ZooKeeper refused to read it (ACL)
)

// reasonOf maps a parse error to its skip reason.
func reasonOf(err error) string {
	for _, r := range []struct {
		err    error
		reason string
	}{
		{ErrTooLong, ReasonOversized},
		{ErrBadEncoding, ReasonBadEncoding},
		{ErrBadHost, ReasonBadHost},
		{ErrBadPort, ReasonBadPort},
		{ErrBadJSON, ReasonBadJSON},
		{ErrBadName, ReasonBadName},
	} {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return ReasonBadURL
}

// instance is one usable registry entry, ready to become an endpoint.
type instance struct {
	path     string // the znode it came from
	key      string // the registry's identity of the service, e.g. "dubbo:prod/com.example.Foo:1.0.0"
	host     string // the service host name
	id       string
	addr     string
	port     uint16
	proto    model.Protocol
	weight   uint32
	labels   map[string]string
	locality string
	meshed   bool
	since    int64 // registration time (Unix ms); the newest of duplicates wins
}

// node is one znode as the watcher understood it: an instance, or why it is skipped.
type node struct {
	path   string
	inst   instance
	reason string // empty for a usable instance
	detail string
}

func skipNode(path, reason, detail string) node {
	return node{path: path, reason: reason, detail: detail}
}

// skipped is a node left out of a snapshot.
type skipped struct {
	path, reason, detail string
}

// protocolRank orders protocols for ties when providers of one service use several: the
// richer protocol for Envoy wins.
func protocolRank(p model.Protocol) int {
	switch p {
	case model.ProtocolGRPC:
		return 0
	case model.ProtocolHTTP2:
		return 1
	case model.ProtocolHTTP:
		return 2
	case model.ProtocolHTTPS:
		return 3
	case model.ProtocolTLS:
		return 4
	default:
		return 5
	}
}

// buildSnapshot turns every node into services, sorted by host name, and lists what it left
// out. Services are built in the order of their registry keys, so when two keys give the same
// host name the first one keeps it.
func buildSnapshot(nodes []node) ([]model.Service, []skipped) {
	byKey := map[string][]instance{}
	var skips []skipped
	for _, n := range nodes {
		if n.reason != "" {
			skips = append(skips, skipped{n.path, n.reason, n.detail})
			continue
		}
		in := n.inst
		in.path = n.path
		byKey[in.key] = append(byKey[in.key], in)
	}
	owner := map[string]string{} // host → key
	out := make([]model.Service, 0, len(byKey))
	for _, key := range slices.Sorted(maps.Keys(byKey)) {
		insts := byKey[key]
		host := insts[0].host
		if other, taken := owner[host]; taken {
			for _, in := range insts {
				skips = append(skips, skipped{in.path, ReasonHostCollision, "host name " + host + " is already used by " + other})
			}
			continue
		}
		owner[host] = key
		svc, sk := buildService(host, insts)
		out = append(out, svc)
		skips = append(skips, sk...)
	}
	slices.SortFunc(out, func(a, b model.Service) int { return cmp.Compare(a.Hostname, b.Hostname) })
	slices.SortFunc(skips, func(a, b skipped) int { return cmp.Or(cmp.Compare(a.path, b.path), cmp.Compare(a.reason, b.reason)) })
	return out, skips
}

// buildService makes one service of the instances of one registry key. The service protocol
// is the one most instances use (ties: GRPC, HTTP2, HTTP, HTTPS, TLS, TCP); instances of other
// protocols are skipped. Of instances sharing an ID or an address:port the newest registration
// wins. The service port is the port most instances use (ties: the lowest).
func buildService(host string, insts []instance) (model.Service, []skipped) {
	var skips []skipped
	counts := map[model.Protocol]int{}
	for _, in := range insts {
		counts[in.proto]++
	}
	proto := slices.MinFunc(slices.Collect(maps.Keys(counts)), func(a, b model.Protocol) int {
		return cmp.Or(cmp.Compare(counts[b], counts[a]), cmp.Compare(protocolRank(a), protocolRank(b)), cmp.Compare(a, b))
	})
	sorted := slices.Clone(insts)
	slices.SortFunc(sorted, func(a, b instance) int {
		return cmp.Or(cmp.Compare(b.since, a.since), cmp.Compare(a.id, b.id), cmp.Compare(a.addr, b.addr), cmp.Compare(a.port, b.port), cmp.Compare(a.path, b.path))
	})
	portName := strings.ToLower(string(proto))
	svc := model.Service{Hostname: host, Source: model.SourceZooKeeper}
	seenID := map[string]string{}
	seenAddr := map[netip.AddrPort]string{}
	ports := map[uint16]int{}
	for _, in := range sorted {
		if in.proto != proto {
			skips = append(skips, skipped{in.path, ReasonOtherProtocol, "protocol " + string(in.proto) + ", the service is " + string(proto)})
			continue
		}
		addr, err := netip.ParseAddr(in.addr)
		if err != nil { // the parsers only let IP addresses through; this is a safety net
			skips = append(skips, skipped{in.path, ReasonBadHost, "address " + in.addr})
			continue
		}
		ap := netip.AddrPortFrom(addr, in.port)
		if winner, dup := seenID[in.id]; dup {
			skips = append(skips, skipped{in.path, ReasonDuplicate, "instance ID " + in.id + " also registered by " + winner})
			continue
		}
		if winner, dup := seenAddr[ap]; dup {
			skips = append(skips, skipped{in.path, ReasonDuplicate, "address " + ap.String() + " also registered by " + winner})
			continue
		}
		seenID[in.id], seenAddr[ap] = in.path, in.path
		ports[in.port]++
		svc.Endpoints = append(svc.Endpoints, model.Endpoint{
			ID:       in.id,
			Address:  in.addr,
			Ports:    map[string]uint32{portName: uint32(in.port)},
			Labels:   maps.Clone(in.labels),
			Locality: in.locality,
			Weight:   in.weight,
			Meshed:   in.meshed,
		})
	}
	svc.Ports = []model.Port{{Name: portName, Number: uint32(mostCommon(ports)), Protocol: proto}}
	svc.Normalize()
	return svc, skips
}

// mostCommon returns the port with the highest count, the lowest of ties.
func mostCommon(counts map[uint16]int) uint16 {
	var best uint16
	bestN := 0
	for p, n := range counts {
		if n > bestN || (n == bestN && p < best) {
			best, bestN = p, n
		}
	}
	return best
}

func equalServices(a, b []model.Service) bool {
	return slices.EqualFunc(a, b, func(x, y model.Service) bool { return x.Equal(&y) })
}
