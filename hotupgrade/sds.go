package hotupgrade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tls "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
)

// The SDS resource names istiod's config refers to: the workload certificate and the roots.
const (
	secretWorkload = "default"
	secretRoots    = "ROOTCA"
)

// SDSConfig configures an SDSServer.
type SDSConfig struct {
	// Socket is the unix socket path Envoy's "sds-grpc" cluster dials.
	Socket string
	CA     *CA
	// TrustDomain, Namespace and ServiceAccount form the workload's SPIFFE id.
	TrustDomain, Namespace, ServiceAccount string
	// TTL of workload certificates (default 24h); they are renewed at two thirds of it.
	TTL    time.Duration
	Logger *slog.Logger
}

func (c *SDSConfig) validate() error {
	if c.Socket == "" || c.CA == nil || c.Namespace == "" {
		return errors.New("sds: Socket, CA and Namespace are required")
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	if c.ServiceAccount == "" {
		c.ServiceAccount = "default"
	}
	if c.TTL <= 0 {
		c.TTL = 24 * time.Hour
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// SDSServer serves the workload certificate and the mesh roots to the local Envoy over SDS on
// a unix socket, as Istio's pilot-agent does, and renews the certificate before it expires.
type SDSServer struct {
	cfg   SDSConfig
	cache cache.SnapshotCache
	grpc  *grpc.Server
	lis   net.Listener
	stop  context.CancelFunc
	wg    sync.WaitGroup
	gen   int
}

// oneNode keys every Envoy to the same snapshot: one SDS socket serves one pod's Envoy
// (and its next epoch during an upgrade).
type oneNode struct{}

func (oneNode) ID(*core.Node) string { return "workload" }

// NewSDSServer issues the first certificate and starts serving.
func NewSDSServer(cfg SDSConfig) (*SDSServer, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &SDSServer{cfg: cfg, cache: cache.NewSnapshotCache(false, oneNode{}, nil)}
	next, err := s.issue()
	if err != nil {
		return nil, err
	}
	_ = os.Remove(cfg.Socket) // a socket left by a previous run
	lis, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("sds: listen on %s: %w", cfg.Socket, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.lis, s.stop = lis, cancel
	s.grpc = grpc.NewServer()
	secretservice.RegisterSecretDiscoveryServiceServer(s.grpc, serverv3.NewServer(ctx, s.cache, nil))
	s.wg.Add(2)
	go func() { defer s.wg.Done(); _ = s.grpc.Serve(lis) }()
	go func() { defer s.wg.Done(); s.renew(ctx, next) }()
	return s, nil
}

// issue signs a new certificate and publishes it; it returns when to renew.
func (s *SDSServer) issue() (time.Duration, error) {
	id, err := s.cfg.CA.Issue(s.cfg.TrustDomain, s.cfg.Namespace, s.cfg.ServiceAccount, s.cfg.TTL)
	if err != nil {
		return 0, fmt.Errorf("sds: %w", err)
	}
	s.gen++
	snap, err := cache.NewSnapshot(strconv.Itoa(s.gen), map[resource.Type][]types.Resource{
		resource.SecretType: {
			&tls.Secret{Name: secretWorkload, Type: &tls.Secret_TlsCertificate{TlsCertificate: &tls.TlsCertificate{
				CertificateChain: inline(id.CertChain),
				PrivateKey:       inline(id.Key),
			}}},
			&tls.Secret{Name: secretRoots, Type: &tls.Secret_ValidationContext{ValidationContext: &tls.CertificateValidationContext{
				TrustedCa: inline(id.Roots),
			}}},
		},
	})
	if err != nil {
		return 0, fmt.Errorf("sds: snapshot: %w", err)
	}
	if err := s.cache.SetSnapshot(context.Background(), oneNode{}.ID(nil), snap); err != nil {
		return 0, fmt.Errorf("sds: set snapshot: %w", err)
	}
	return time.Until(id.NotAfter) * 2 / 3, nil
}

func (s *SDSServer) renew(ctx context.Context, next time.Duration) {
	for {
		t := time.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		d, err := s.issue()
		if err != nil {
			s.cfg.Logger.Error("workload certificate renewal failed; retrying in 1m", "error", err)
			d = time.Minute
		}
		next = d
	}
}

func inline(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}

// Close stops serving and removes the socket.
func (s *SDSServer) Close() error {
	s.stop()
	s.grpc.Stop()
	s.wg.Wait()
	if err := os.Remove(s.cfg.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("sds: remove socket: %w", err)
	}
	return nil
}
