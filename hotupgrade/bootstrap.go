package hotupgrade

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	httpopts "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// SidecarBootstrap describes an Envoy sidecar that takes its config from istiod, the part of
// Istio's pilot-agent meshturbo needs (without the certificate authority: xDS is plaintext).
type SidecarBootstrap struct {
	// IstiodAddr is istiod's plaintext xDS address, host:port.
	IstiodAddr string
	// AdminAddr is Envoy's admin listener, e.g. 127.0.0.1:15000. Keep it on loopback.
	AdminAddr string
	// IP is the workload's address; PodName and Namespace name it as istiod expects.
	IP        string
	PodName   string
	Namespace string
	// Labels are the workload's labels (istiod selects Sidecar and other config by them).
	Labels map[string]string
	// HTTPProxyPort, when set, asks istiod for an HTTP proxy listener on 127.0.0.1:<port>:
	// an app (or a test) with no traffic interception sends requests there with the
	// service's host name, and Envoy routes them as it would intercepted ones.
	HTTPProxyPort int
	// ClusterID is the Istio cluster id (default "Kubernetes").
	ClusterID string
	// IstioVersion is the proxy version reported to istiod (default "1.31.0").
	IstioVersion string
	// DNSDomain is the cluster domain (default "cluster.local").
	DNSDomain string
}

func (b *SidecarBootstrap) validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(b.IstiodAddr); err != nil {
		errs = append(errs, fmt.Errorf("IstiodAddr %q: %w", b.IstiodAddr, err))
	}
	if _, _, err := net.SplitHostPort(b.AdminAddr); err != nil {
		errs = append(errs, fmt.Errorf("AdminAddr %q: %w", b.AdminAddr, err))
	}
	if net.ParseIP(b.IP) == nil {
		errs = append(errs, fmt.Errorf("IP %q is not an IP address", b.IP))
	}
	if b.PodName == "" || b.Namespace == "" {
		errs = append(errs, errors.New("PodName and Namespace must be set"))
	}
	if b.HTTPProxyPort < 0 || b.HTTPProxyPort > 65535 {
		errs = append(errs, fmt.Errorf("HTTPProxyPort %d is outside 0-65535", b.HTTPProxyPort))
	}
	if b.ClusterID == "" {
		b.ClusterID = "Kubernetes"
	}
	if b.IstioVersion == "" {
		b.IstioVersion = "1.31.0"
	}
	if b.DNSDomain == "" {
		b.DNSDomain = "cluster.local"
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sidecar bootstrap: %w", err)
	}
	return nil
}

// NodeID is the Envoy node id istiod parses: sidecar~<ip>~<pod>.<ns>~<ns>.svc.<domain>.
func (b *SidecarBootstrap) NodeID() string {
	return fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.%s", b.IP, b.PodName, b.Namespace, b.Namespace, b.DNSDomain)
}

// JSON renders the Envoy bootstrap.
func (b SidecarBootstrap) JSON() ([]byte, error) {
	if err := b.validate(); err != nil {
		return nil, err
	}
	bs, err := b.proto()
	if err != nil {
		return nil, err
	}
	return protojson.MarshalOptions{Indent: "  "}.Marshal(bs)
}

func (b *SidecarBootstrap) proto() (*bootstrap.Bootstrap, error) {
	labels := map[string]any{}
	for k, v := range b.Labels {
		labels[k] = v
	}
	md := map[string]any{
		"ISTIO_VERSION":     b.IstioVersion,
		"CLUSTER_ID":        b.ClusterID,
		"NAMESPACE":         b.Namespace,
		"NAME":              b.PodName,
		"WORKLOAD_NAME":     b.PodName,
		"INSTANCE_IPS":      b.IP,
		"INTERCEPTION_MODE": "REDIRECT",
		"LABELS":            labels,
		"MESH_ID":           "cluster.local",
	}
	if b.HTTPProxyPort > 0 {
		md["HTTP_PROXY_PORT"] = strconv.Itoa(b.HTTPProxyPort)
	}
	meta, err := structpb.NewStruct(md)
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	adminHost, adminPort, _ := net.SplitHostPort(b.AdminAddr)
	xdsHost, xdsPort, _ := net.SplitHostPort(b.IstiodAddr)
	h2, err := anypb.New(&httpopts.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &core.Http2ProtocolOptions{},
				},
			},
		},
	})
	if err != nil {
		return nil, err
	}
	ads := &core.ConfigSource{
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
		ResourceApiVersion:    core.ApiVersion_V3,
		InitialFetchTimeout:   durationpb.New(0),
	}
	return &bootstrap.Bootstrap{
		Node: &core.Node{
			Id:       b.NodeID(),
			Cluster:  b.PodName + "." + b.Namespace,
			Metadata: meta,
		},
		Admin: &bootstrap.Admin{
			Address: socketAddress(adminHost, adminPort),
		},
		DynamicResources: &bootstrap.Bootstrap_DynamicResources{
			AdsConfig: &core.ApiConfigSource{
				ApiType:                   core.ApiConfigSource_GRPC,
				TransportApiVersion:       core.ApiVersion_V3,
				SetNodeOnFirstMessageOnly: true,
				GrpcServices: []*core.GrpcService{{
					TargetSpecifier: &core.GrpcService_EnvoyGrpc_{EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: "xds-grpc"}},
				}},
			},
			CdsConfig: ads,
			LdsConfig: ads,
		},
		StaticResources: &bootstrap.Bootstrap_StaticResources{
			Clusters: []*cluster.Cluster{{
				Name:                 "xds-grpc",
				ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
				ConnectTimeout:       durationpb.New(time.Second),
				TypedExtensionProtocolOptions: map[string]*anypb.Any{
					"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2,
				},
				LoadAssignment: &endpoint.ClusterLoadAssignment{
					ClusterName: "xds-grpc",
					Endpoints: []*endpoint.LocalityLbEndpoints{{
						LbEndpoints: []*endpoint.LbEndpoint{{
							HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
								Address: socketAddress(xdsHost, xdsPort),
							}},
						}},
					}},
				},
			}},
		},
	}, nil
}

func socketAddress(host, port string) *core.Address {
	p, _ := strconv.Atoi(port)
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address:       host,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(p)},
	}}}
}
