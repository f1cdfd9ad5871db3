// Package xds is meshturbo's xDS server. It serves Istio config (ServiceEntry, Sidecar, …) to
// istiod over MCP-over-xDS — istiod lists it in meshConfig.configSources as xds://host:port and
// opens one ADS stream asking for every Istio config type — from a Store that keeps the state of
// the world per type. State (Store) is kept apart from protocol (go-control-plane's server).
package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// The Istio config types istiod asks an MCP config source for.
const (
	TypeMeshConfig            = "core/v1alpha1/MeshConfig"
	TypeAuthorizationPolicy   = "security.istio.io/v1/AuthorizationPolicy"
	TypePeerAuthentication    = "security.istio.io/v1/PeerAuthentication"
	TypeRequestAuthentication = "security.istio.io/v1/RequestAuthentication"
	TypeDestinationRule       = "networking.istio.io/v1/DestinationRule"
	TypeGateway               = "networking.istio.io/v1/Gateway"
	TypeServiceEntry          = "networking.istio.io/v1/ServiceEntry"
	TypeSidecar               = "networking.istio.io/v1/Sidecar"
	TypeVirtualService        = "networking.istio.io/v1/VirtualService"
	TypeWorkloadEntry         = "networking.istio.io/v1/WorkloadEntry"
	TypeWorkloadGroup         = "networking.istio.io/v1/WorkloadGroup"
	TypeEnvoyFilter           = "networking.istio.io/v1alpha3/EnvoyFilter"
	TypeProxyConfig           = "networking.istio.io/v1beta1/ProxyConfig"
	TypeTelemetry             = "telemetry.istio.io/v1/Telemetry"
	TypeTrafficExtension      = "extensions.istio.io/v1alpha1/TrafficExtension"
	TypeWasmPlugin            = "extensions.istio.io/v1alpha1/WasmPlugin"
)

// IstioTypes lists every type istiod watches on an MCP source. All are answered, even when empty.
var IstioTypes = []string{
	TypeMeshConfig, TypeAuthorizationPolicy, TypePeerAuthentication, TypeRequestAuthentication,
	TypeDestinationRule, TypeGateway, TypeServiceEntry, TypeSidecar, TypeVirtualService,
	TypeWorkloadEntry, TypeWorkloadGroup, TypeEnvoyFilter, TypeProxyConfig, TypeTelemetry,
	TypeTrafficExtension, TypeWasmPlugin,
}

// Config configures a Server.
type Config struct {
	// Addr is the listen address, e.g. "127.0.0.1:15010". Port 0 picks a free port.
	Addr string
	// Store is the state to serve. Required.
	Store *Store
	// Register, when set, adds more gRPC services (e.g. the lazy-load access-log receiver)
	// to the server before it starts.
	Register func(*grpc.Server)
	Logger   *slog.Logger
}

func (c *Config) validate() error {
	if c.Addr == "" {
		return errors.New("xds: Config.Addr is empty; set a listen address such as 127.0.0.1:15010")
	}
	if c.Store == nil {
		return errors.New("xds: Config.Store is nil")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Server serves a Store over ADS on a gRPC listener.
type Server struct {
	log  *slog.Logger
	lis  net.Listener
	grpc *grpc.Server
	stop context.CancelFunc
	done chan error

	mu      sync.Mutex
	clients map[int64]*ClientInfo
}

// ClientInfo describes a connected xDS client, for admin status.
type ClientInfo struct {
	NodeID    string    `json:"node_id"`
	Connected time.Time `json:"connected"`
	// Acked maps type URL to the last version the client acknowledged.
	Acked map[string]string `json:"acked"`
	// Nacked maps type URL to the last error the client reported.
	Nacked map[string]string `json:"nacked,omitempty"`
}

// New listens on cfg.Addr and starts serving. Close stops it.
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("xds: listen on %s: %w", cfg.Addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		log:     cfg.Logger,
		lis:     lis,
		stop:    cancel,
		done:    make(chan error, 1),
		clients: map[int64]*ClientInfo{},
	}
	s.grpc = grpc.NewServer(
		grpc.MaxRecvMsgSize(64<<20),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	xs := serverv3.NewServer(ctx, cfg.Store, s.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(s.grpc, xs)
	if cfg.Register != nil {
		cfg.Register(s.grpc)
	}
	go func() { s.done <- s.grpc.Serve(lis) }()
	s.log.Info("xds server listening", "addr", lis.Addr().String())
	return s, nil
}

// Addr returns the address the server listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Clients returns a snapshot of connected clients.
func (s *Server) Clients() []ClientInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ClientInfo, 0, len(s.clients))
	for _, c := range s.clients {
		cp := *c
		cp.Acked = cloneMap(c.Acked)
		cp.Nacked = cloneMap(c.Nacked)
		out = append(out, cp)
	}
	return out
}

func cloneMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Close stops the server, ending every stream.
func (s *Server) Close() error {
	s.stop()
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(2 * time.Second):
		s.grpc.Stop()
		<-stopped
	}
	if err := <-s.done; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("xds: serve: %w", err)
	}
	return nil
}

func (s *Server) callbacks() serverv3.CallbackFuncs {
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			s.mu.Lock()
			s.clients[id] = &ClientInfo{Connected: time.Now(), Acked: map[string]string{}, Nacked: map[string]string{}}
			s.mu.Unlock()
			return nil
		},
		StreamClosedFunc: func(id int64, node *core.Node) {
			s.mu.Lock()
			delete(s.clients, id)
			s.mu.Unlock()
			s.log.Info("xds client disconnected", "node", node.GetId())
		},
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			s.mu.Lock()
			defer s.mu.Unlock()
			c, ok := s.clients[id]
			if !ok {
				return nil
			}
			if c.NodeID == "" && req.GetNode().GetId() != "" {
				c.NodeID = req.GetNode().GetId()
				s.log.Info("xds client connected", "node", c.NodeID)
			}
			if e := req.GetErrorDetail(); e != nil {
				c.Nacked[req.GetTypeUrl()] = e.GetMessage()
				s.log.Warn("xds client rejected config", "node", c.NodeID, "type", req.GetTypeUrl(), "error", e.GetMessage())
			} else if req.GetVersionInfo() != "" {
				c.Acked[req.GetTypeUrl()] = req.GetVersionInfo()
				delete(c.Nacked, req.GetTypeUrl())
			}
			return nil
		},
	}
}
