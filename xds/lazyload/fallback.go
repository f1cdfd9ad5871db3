package lazyload

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	grpcals "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	routerfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	rawbuffer "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpopts "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshturbo/meshturbo/model"
)

// The fallback Envoy is driven by meshturbo-xds directly (not by istiod), under this node id.
const FallbackNodeID = "meshturbo-fallback"

const (
	certSecret  = "fallback-cert"
	rootsSecret = "fallback-roots"
	alsCluster  = "meshturbo_als"
	xdsCluster  = "meshturbo_xds"
	logName     = "meshturbo-lazyload"
)

// clusterName names the fallback's cluster for one service port; the access-log receiver
// reads host and port back from it.
func clusterName(host string, port uint32) string {
	return "lazy|" + strconv.Itoa(int(port)) + "|" + host
}

// parseClusterName is the inverse of clusterName.
func parseClusterName(name string) (host string, port uint32, ok bool) {
	rest, found := strings.CutPrefix(name, "lazy|")
	if !found {
		return "", 0, false
	}
	p, h, found := strings.Cut(rest, "|")
	n, err := strconv.ParseUint(p, 10, 32)
	if !found || err != nil || h == "" {
		return "", 0, false
	}
	return h, uint32(n), true
}

// FallbackResources is the fallback Envoy's whole configuration apart from its bootstrap.
type FallbackResources struct {
	Clusters  map[string]proto.Message
	Listeners map[string]proto.Message
	Secrets   map[string]proto.Message
	// Unroutable lists TCP ports the fallback cannot serve, with the reason.
	Unroutable map[uint32]string
}

// fallbackResources builds the fallback's config from the catalog: a cluster per service
// port, one mTLS HTTP listener that routes every HTTP service by host name, and one mTLS TCP
// listener per TCP port that exactly one service uses. Every listener logs each call over gRPC
// access logging to meshturbo-xds, which turns it into an edge.
func fallbackResources(cat *model.Catalog, fb Fallback, id *Identity) (*FallbackResources, error) {
	fb.defaults()
	out := &FallbackResources{
		Clusters: map[string]proto.Message{}, Listeners: map[string]proto.Message{}, Secrets: map[string]proto.Message{},
		Unroutable: map[uint32]string{},
	}
	out.Secrets[certSecret] = &tlsv3.Secret{Name: certSecret, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: id.CertChain}},
		PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: id.Key}},
	}}}
	out.Secrets[rootsSecret] = &tlsv3.Secret{Name: rootsSecret, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: id.Roots}},
	}}}

	var vhosts []*route.VirtualHost
	tcpOwners := map[uint32][]string{}
	for i := range cat.Services {
		svc := &cat.Services[i]
		lowestHTTP := uint32(0)
		for _, p := range svc.Ports {
			c, err := serviceCluster(svc, p)
			if err != nil {
				return nil, err
			}
			out.Clusters[c.Name] = c
			if !p.Protocol.IsHTTP() {
				tcpOwners[p.Number] = append(tcpOwners[p.Number], svc.Hostname)
				continue
			}
			domains := []string{svc.Hostname + ":" + strconv.Itoa(int(p.Number))}
			if lowestHTTP == 0 {
				lowestHTTP = p.Number // ports are sorted: a Host without a port means the lowest
				domains = append(domains, svc.Hostname)
			}
			vhosts = append(vhosts, &route.VirtualHost{
				Name:    svc.Hostname + ":" + strconv.Itoa(int(p.Number)),
				Domains: domains,
				Routes: []*route.Route{{
					Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					Action: &route.Route_Route{Route: &route.RouteAction{
						ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName(svc.Hostname, p.Number)},
						Timeout:          durationpb.New(0), // streams and long calls pass as they would direct
					}},
				}},
			})
		}
	}
	vhosts = append(vhosts, &route.VirtualHost{
		Name: "unknown", Domains: []string{"*"},
		Routes: []*route.Route{{
			Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
			Action: &route.Route_DirectResponse{DirectResponse: &route.DirectResponseAction{
				Status: 404,
				Body:   &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: "meshturbo fallback: no bridged service has this host name\n"}},
			}},
		}},
	})
	httpL, err := httpListener(fb, vhosts)
	if err != nil {
		return nil, err
	}
	out.Listeners[httpL.Name] = httpL
	for port, owners := range tcpOwners {
		if port == fb.HTTPPort {
			out.Unroutable[port] = "the fallback's own HTTP port"
			continue
		}
		if len(owners) > 1 {
			out.Unroutable[port] = fmt.Sprintf("TCP port shared by %s: a raw TCP caller cannot be told apart; declare the dependency in config", strings.Join(owners, ", "))
			continue
		}
		l, err := tcpListener(fb, port, clusterName(owners[0], port))
		if err != nil {
			return nil, err
		}
		out.Listeners[l.Name] = l
	}
	return out, nil
}

var adsSource = &core.ConfigSource{
	ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	ResourceApiVersion:    core.ApiVersion_V3,
}

func sdsConfig(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: adsSource}
}

// downstreamTLS requires a mesh certificate from every caller: the caller's SPIFFE id is
// how the fallback knows which workload called.
func downstreamTLS(alpn ...string) (*core.TransportSocket, error) {
	ctx, err := anypb.New(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig(certSecret)},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: sdsConfig(rootsSecret),
			},
			AlpnProtocols: alpn,
		},
	})
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: ctx}}, nil
}

func grpcLogger(tcp bool) (*accesslog.AccessLog, error) {
	common := &grpcals.CommonGrpcAccessLogConfig{
		LogName:             logName,
		TransportApiVersion: core.ApiVersion_V3,
		GrpcService: &core.GrpcService{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
			EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: alsCluster},
		}},
		// Learning speed is bounded by this flush: a short one makes the direct path come fast.
		BufferFlushInterval: durationpb.New(100 * time.Millisecond),
	}
	var cfg proto.Message = &grpcals.HttpGrpcAccessLogConfig{CommonConfig: common, AdditionalRequestHeadersToLog: []string{"content-type"}}
	name := "envoy.access_loggers.http_grpc"
	if tcp {
		cfg = &grpcals.TcpGrpcAccessLogConfig{CommonConfig: common}
		name = "envoy.access_loggers.tcp_grpc"
	}
	a, err := anypb.New(cfg)
	if err != nil {
		return nil, err
	}
	return &accesslog.AccessLog{Name: name, ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: a}}, nil
}

func listenAddress(host string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address: host, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

func httpListener(fb Fallback, vhosts []*route.VirtualHost) (*listener.Listener, error) {
	router, err := anypb.New(&routerfilter.Router{})
	if err != nil {
		return nil, err
	}
	logger, err := grpcLogger(false)
	if err != nil {
		return nil, err
	}
	mgr, err := anypb.New(&hcm.HttpConnectionManager{
		StatPrefix: "fallback_http",
		CodecType:  hcm.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: "fallback", VirtualHosts: vhosts, ValidateClusters: wrapperspb.Bool(false),
		}},
		HttpFilters: []*hcm.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: router}}},
		AccessLog:   []*accesslog.AccessLog{logger},
		// Learn when a request starts, not when a long gRPC stream ends.
		AccessLogOptions: &hcm.HttpConnectionManager_HcmAccessLogOptions{FlushAccessLogOnNewRequest: true},
	})
	if err != nil {
		return nil, err
	}
	ts, err := downstreamTLS("h2", "http/1.1")
	if err != nil {
		return nil, err
	}
	return &listener.Listener{
		Name:    "fallback_http",
		Address: listenAddress(fb.Address, fb.HTTPPort),
		FilterChains: []*listener.FilterChain{{
			TransportSocket: ts,
			Filters:         []*listener.Filter{{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listener.Filter_TypedConfig{TypedConfig: mgr}}},
		}},
	}, nil
}

func tcpListener(fb Fallback, port uint32, target string) (*listener.Listener, error) {
	logger, err := grpcLogger(true)
	if err != nil {
		return nil, err
	}
	proxy, err := anypb.New(&tcpproxy.TcpProxy{
		StatPrefix:       "fallback_tcp_" + strconv.Itoa(int(port)),
		ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: target},
		AccessLog:        []*accesslog.AccessLog{logger},
		// Learn at connect time, not when a long-lived connection ends.
		AccessLogOptions: &tcpproxy.TcpProxy_TcpAccessLogOptions{FlushAccessLogOnConnected: true},
	})
	if err != nil {
		return nil, err
	}
	ts, err := downstreamTLS()
	if err != nil {
		return nil, err
	}
	return &listener.Listener{
		Name:    "fallback_tcp_" + strconv.Itoa(int(port)),
		Address: listenAddress(fb.Address, port),
		FilterChains: []*listener.FilterChain{{
			TransportSocket: ts,
			Filters:         []*listener.Filter{{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listener.Filter_TypedConfig{TypedConfig: proxy}}},
		}},
	}, nil
}

// serviceCluster is the fallback's cluster for one service port, with the service's
// endpoints. Meshed endpoints get Istio mTLS, the others plaintext, as a sidecar would.
func serviceCluster(svc *model.Service, p model.Port) (*cluster.Cluster, error) {
	name := clusterName(svc.Hostname, p.Number)
	var lbs []*endpoint.LbEndpoint
	for _, ep := range svc.Endpoints {
		port := p.Number
		if n, ok := ep.Ports[p.Name]; ok && n != 0 {
			port = n
		}
		lb := &endpoint.LbEndpoint{
			HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: listenAddress(ep.Address, port)}},
		}
		if ep.Weight > 0 {
			lb.LoadBalancingWeight = wrapperspb.UInt32(ep.Weight)
		}
		if ep.Meshed {
			md, err := structpb.NewStruct(map[string]any{"tlsMode": "istio"})
			if err != nil {
				return nil, err
			}
			lb.Metadata = &core.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.transport_socket_match": md}}
		}
		lbs = append(lbs, lb)
	}
	c := &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(2 * time.Second),
		LoadAssignment:       &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: lbs}}},
	}
	if p.Protocol == model.ProtocolHTTP2 || p.Protocol == model.ProtocolGRPC {
		h2, err := http2Options()
		if err != nil {
			return nil, err
		}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2}
	}
	up, err := anypb.New(&tlsv3.UpstreamTlsContext{
		Sni: fmt.Sprintf("outbound_.%d_._.%s", p.Number, svc.Hostname),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig(certSecret)},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: sdsConfig(rootsSecret),
			},
			AlpnProtocols: []string{"istio"},
		},
	})
	if err != nil {
		return nil, err
	}
	match, _ := structpb.NewStruct(map[string]any{"tlsMode": "istio"})
	c.TransportSocketMatches = []*cluster.Cluster_TransportSocketMatch{
		{Name: "tlsMode-istio", Match: match, TransportSocket: &core.TransportSocket{
			Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: up},
		}},
		{Name: "plaintext", Match: &structpb.Struct{}, TransportSocket: &core.TransportSocket{
			Name: "envoy.transport_sockets.raw_buffer", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: rawBuffer},
		}},
	}
	return c, nil
}

// rawBuffer is the plaintext transport socket; marshalling an empty message cannot fail.
var rawBuffer, _ = anypb.New(&rawbuffer.RawBuffer{})

// Identity is the fallback's mesh certificate, key and trusted roots, in PEM.
type Identity struct {
	CertChain, Key, Roots []byte
}

func http2Options() (*anypb.Any, error) {
	return anypb.New(&httpopts.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &core.Http2ProtocolOptions{},
				},
			},
		},
	})
}

// FallbackBootstrap is the fallback Envoy's bootstrap: node FallbackNodeID, ADS and access
// logs to meshturbo-xds at xdsAddr, admin on adminAddr.
func FallbackBootstrap(xdsAddr, adminAddr string) ([]byte, error) {
	xh, xp, err := net.SplitHostPort(xdsAddr)
	if err != nil {
		return nil, fmt.Errorf("fallback bootstrap: xds address %q: %w", xdsAddr, err)
	}
	ah, ap, err := net.SplitHostPort(adminAddr)
	if err != nil {
		return nil, fmt.Errorf("fallback bootstrap: admin address %q: %w", adminAddr, err)
	}
	xport, _ := strconv.Atoi(xp)
	aport, _ := strconv.Atoi(ap)
	h2, err := http2Options()
	if err != nil {
		return nil, err
	}
	grpcCluster := func(name string) *cluster.Cluster {
		return &cluster.Cluster{
			Name:                          name,
			ClusterDiscoveryType:          &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
			ConnectTimeout:                durationpb.New(time.Second),
			TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
			LoadAssignment: &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{
				LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{
					Endpoint: &endpoint.Endpoint{Address: listenAddress(xh, uint32(xport))},
				}}},
			}}},
		}
	}
	bs := &bootstrap.Bootstrap{
		Node:  &core.Node{Id: FallbackNodeID, Cluster: FallbackNodeID},
		Admin: &bootstrap.Admin{Address: listenAddress(ah, uint32(aport))},
		DynamicResources: &bootstrap.Bootstrap_DynamicResources{
			AdsConfig: &core.ApiConfigSource{
				ApiType:             core.ApiConfigSource_GRPC,
				TransportApiVersion: core.ApiVersion_V3,
				GrpcServices: []*core.GrpcService{{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: xdsCluster},
				}}},
			},
			CdsConfig: adsSource,
			LdsConfig: adsSource,
		},
		StaticResources: &bootstrap.Bootstrap_StaticResources{
			Clusters: []*cluster.Cluster{grpcCluster(xdsCluster), grpcCluster(alsCluster)},
		},
	}
	return protojson.MarshalOptions{Indent: "  "}.Marshal(bs)
}

// typeURLs of the fallback's resources, in the order Envoy needs them.
var (
	typeCluster  = resource.ClusterType
	typeListener = resource.ListenerType
	typeSecret   = resource.SecretType
)
