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
	// InterceptionMode is how app traffic reaches Envoy: "REDIRECT" (iptables or the BPF
	// connect redirection, Istio's default) or "NONE", where nothing intercepts and istiod
	// makes Envoy bind each service port on 127.0.0.1 so apps call it there directly.
	InterceptionMode string
	// ClusterID is the Istio cluster id (default "Kubernetes").
	ClusterID string
	// IstioVersion is the proxy version reported to istiod (default "1.31.0").
	IstioVersion string
	// DNSDomain is the cluster domain (default "cluster.local").
	DNSDomain string
	// SDSSocket is the unix socket of the SDS server that hands Envoy its workload
	// certificate (see SDSServer). istiod's config names an "sds-grpc" cluster for it;
	// without one, Envoy waits for its certificates forever and never becomes ready.
	SDSSocket string
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
	if b.SDSSocket == "" {
		errs = append(errs, errors.New("SDSSocket must be set: istiod's config needs the workload certificate"))
	}
	switch b.InterceptionMode {
	case "":
		b.InterceptionMode = "REDIRECT"
	case "REDIRECT", "NONE":
	default:
		errs = append(errs, fmt.Errorf("InterceptionMode %q is not REDIRECT or NONE", b.InterceptionMode))
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
		"INTERCEPTION_MODE": b.InterceptionMode,
		"LABELS":            labels,
		"MESH_ID":           "cluster.local",
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
			Clusters: []*cluster.Cluster{
				grpcCluster("xds-grpc", socketAddress(xdsHost, xdsPort), h2),
				grpcCluster("sds-grpc", &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: b.SDSSocket}}}, h2),
			},
		},
	}, nil
}

func grpcCluster(name string, addr *core.Address, h2 *anypb.Any) *cluster.Cluster {
	return &cluster.Cluster{
		Name:                          name,
		ClusterDiscoveryType:          &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:                durationpb.New(time.Second),
		TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
		LoadAssignment: &endpoint.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				LbEndpoints: []*endpoint.LbEndpoint{{
					HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: addr}},
				}},
			}},
		},
	}
}

func socketAddress(host, port string) *core.Address {
	p, _ := strconv.Atoi(port)
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Address:       host,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(p)},
	}}}
}
