// Package lazyload narrows each chosen workload's sidecar to the services it really calls,
// learned from traffic, without ever failing a first call.
//
// # How a call flows
//
// A lazy-loaded workload gets an Istio Sidecar resource (served to istiod over MCP, one per
// workload selector) whose egress hosts are:
//
//   - the fallback — a real Envoy with a cluster for every bridged service, driven by
//     meshturbo-xds over its own ADS port (node id FallbackNodeID, Envoy resource types in the
//     same Store) — set as the Sidecar's outboundTrafficPolicy.egressProxy (mode ALLOW_ANY);
//   - every host the workload has an edge to (learned or declared in config);
//   - one stand-in ServiceEntry per mesh port that none of those hosts uses. A stand-in
//     keeps a listener on that port in the sidecar. On an HTTP port the listener's only route is
//     Istio's catch-all, which sends an unknown host to the egress proxy; on a TCP port the
//     stand-in's endpoint is the fallback's listener on the same port, which forwards to the one
//     service behind that port. (A TCP port several services share cannot be told apart from a
//     raw connection: it is reported in the admin API and metrics, and such dependencies are
//     declared in config.) Istio builds an explicit-port egress listener only for services that
//     have that port, which is why HTTP ports need a stand-in service too.
//
// The sidecar reaches the fallback over Istio mTLS (its ServiceEntry endpoints carry
// security.istio.io/tlsMode=istio and its SPIFFE id as subjectAltNames), so the fallback sees
// the caller's SPIFFE id. Each call through the fallback is logged over gRPC access logging
// (envoy.service.accesslog.v3, flushed at request start and at TCP connect) to meshturbo-xds:
// the caller's SPIFFE id names the workload (namespace and service account), the fallback
// cluster "lazy|<port>|<host>" names the destination — the same for HTTP/1, HTTP/2, gRPC and TCP.
// A new edge widens the workload's Sidecar at once; istiod pushes the direct route; later calls
// no longer touch the fallback.
//
// # Why Istio minor upgrades do not break it
//
// Everything given to istiod is stable, documented API (networking.istio.io/v1 Sidecar with
// egress hosts and outboundTrafficPolicy.egressProxy, ServiceEntry); no EnvoyFilter patches
// Istio's generated listener or route names, which change between releases. The fallback is
// configured by meshturbo, not by istiod, so Istio's generated config never has to match it.
// What the design relies on in istiod's behaviour — unknown hosts on an HTTP listener go to the
// egress proxy; a Sidecar only pulls in the services its hosts select; a change to a service
// outside a proxy's scope causes no push to it — is Istio's documented contract for those
// fields, and the e2e test and bench-lazyload check each of them against the real istiod.
//
// # Edges
//
// Edges (workload → host:port) live in a Graph with a TTL: unused for the TTL, a learned edge
// leaves the scope in a periodic sweep; one learned again within a TTL of expiring has its life
// doubled (up to 8×), so intermittent callers settle instead of flapping. Static edges from
// config never expire. Learned edges persist in a small JSON file (see persist.go for why a file)
// so a restart of meshturbo-xds keeps every edge, and the same edges give the same Sidecar
// versions — nothing is pushed after a restart.
package lazyload
