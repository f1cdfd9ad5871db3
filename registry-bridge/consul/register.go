package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meshturbo/meshturbo/registry-bridge/internal/keeper"
)

// ReverseMetaKey marks instances meshturbo registered into Consul. The watcher never imports
// them back, so a mesh service is never bridged into the mesh a second time as a loop.
const ReverseMetaKey = "meshturbo-reverse"

// MeshService is a mesh service to make findable by non-mesh callers.
type MeshService struct {
	Name    string
	Address string
	Port    int
	// Protocol is recorded as meta "protocol" (http, grpc, tcp, …).
	Protocol string
	Tags     []string
	Meta     map[string]string
	// HealthHTTP, when set, is an http(s) URL Consul probes; else Consul checks TCP Address:Port.
	HealthHTTP string
}

// RegistrarConfig configures a Registrar.
type RegistrarConfig struct {
	Address    string
	Datacenter string
	Token      string
	TLS        *TLS
	Services   []MeshService
	// CheckInterval is how often Consul probes each service (default 5s).
	CheckInterval time.Duration
	// Retry is how often registration is retried while Consul is unreachable (default 2s).
	Retry  time.Duration
	Logger *slog.Logger
}

func (c *RegistrarConfig) validate() error {
	if c.Address == "" {
		return errors.New("consul registrar: Address is empty")
	}
	var errs []error
	for i, s := range c.Services {
		if s.Name == "" || net.ParseIP(s.Address) == nil || s.Port <= 0 || s.Port > 65535 {
			errs = append(errs, fmt.Errorf("consul registrar: services[%d] (%q): name, an IP address and a port 1-65535 are required", i, s.Name))
		}
	}
	if c.CheckInterval <= 0 {
		c.CheckInterval = 5 * time.Second
	}
	if c.Retry <= 0 {
		c.Retry = 2 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return errors.Join(errs...)
}

// Registrar registers mesh services into Consul, with health checks Consul runs itself, keeps
// them registered (re-registering after a Consul restart) and deregisters them on Close.
type Registrar struct {
	cfg    RegistrarConfig
	client *api.Client
	loop   *keeper.Loop // keeps the services registered; stopped by Close
}

// NewRegistrar validates cfg and starts registering in the background.
func NewRegistrar(cfg RegistrarConfig) (*Registrar, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	w, err := New(Config{Address: cfg.Address, Datacenter: cfg.Datacenter, Token: cfg.Token, TLS: cfg.TLS})
	if err != nil {
		return nil, err
	}
	r := &Registrar{cfg: cfg, client: w.client}
	// Every Retry: a Consul agent restarted in dev mode, or wiped, forgets the services.
	r.loop = keeper.Start(cfg.Retry, r.ensure, func(err error) {
		r.cfg.Logger.Warn("consul reverse registration failed; retrying", "address", r.cfg.Address, "error", err, "retry_in", r.cfg.Retry)
	})
	return r, nil
}

func serviceID(s MeshService) string {
	return "meshturbo-" + s.Name + "-" + s.Address + "-" + strconv.Itoa(s.Port)
}

func (r *Registrar) registration(s MeshService) *api.AgentServiceRegistration {
	meta := map[string]string{ReverseMetaKey: "true"}
	for k, v := range s.Meta {
		meta[k] = v
	}
	if s.Protocol != "" {
		meta["protocol"] = s.Protocol
	}
	check := &api.AgentServiceCheck{
		Interval:                       r.cfg.CheckInterval.String(),
		Timeout:                        "2s",
		DeregisterCriticalServiceAfter: "10m",
	}
	if s.HealthHTTP != "" {
		check.HTTP = s.HealthHTTP
	} else {
		check.TCP = net.JoinHostPort(s.Address, strconv.Itoa(s.Port))
	}
	return &api.AgentServiceRegistration{
		ID: serviceID(s), Name: s.Name, Address: s.Address, Port: s.Port,
		Tags: s.Tags, Meta: meta, Check: check,
	}
}

func (r *Registrar) ensure(ctx context.Context) error {
	have, err := r.client.Agent().ServicesWithFilterOpts("", (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return err
	}
	for _, s := range r.cfg.Services {
		if _, ok := have[serviceID(s)]; ok {
			continue
		}
		if err := r.client.Agent().ServiceRegisterOpts(r.registration(s), api.ServiceRegisterOpts{}.WithContext(ctx)); err != nil {
			return fmt.Errorf("register %s: %w", s.Name, err)
		}
		r.cfg.Logger.Info("registered mesh service in consul", "service", s.Name, "id", serviceID(s))
	}
	return nil
}

// Registered reports whether every service has been registered at least once.
func (r *Registrar) Registered() bool { return r.loop.Registered() }

// Close stops and deregisters every service.
func (r *Registrar) Close() error {
	r.loop.Stop()
	var errs []error
	for _, s := range r.cfg.Services {
		if err := r.client.Agent().ServiceDeregister(serviceID(s)); err != nil {
			errs = append(errs, fmt.Errorf("deregister %s from consul: %w", s.Name, err))
		}
	}
	return errors.Join(errs...)
}
